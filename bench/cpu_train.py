"""CPU training throughput, steady state: `coordinator train` vs a PyTorch + HF transformers loop.

Same model, block, micro-batch, no accumulation, AdamW + clipping + linear schedule, fp32, the same
torch threads (the default: all cores), same machine, same run. Steady state = every step after
the first. MODEL picks the shape:
- `codegen-4x256` (default): bench/codegen-4x256.json (4 layers, n_embd 256, vocab 2048), block
  256, micro-batch 8, a tokenizer trained on the data;
- `qwen2.5-coder-0.5b`: the Qwen2.5-Coder-0.5B shape (the --config_name preset, its 151936-row
  vocabulary kept: the data is tokenized by the test fixtures' tokenizer), block 512, micro-batch 1.

    MODEL=codegen-4x256 .venv/bin/python bench/cpu_train.py DATA.jsonl WORKDIR [STEPS]
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import os

import torch
from transformers import CodeGenConfig, CodeGenForCausalLM, Qwen2Config, Qwen2ForCausalLM

ROOT = Path(__file__).resolve().parent.parent
MODEL = os.environ.get("MODEL", "codegen-4x256")
CODEGEN = ROOT / "bench/codegen-4x256.json"
# name -> (our model flags, the HF model, micro-batch, block)
MODELS = {
    "codegen-4x256": (["--config_name", str(CODEGEN), "--train_tokenizer", "2048"],
                      lambda: CodeGenForCausalLM(CodeGenConfig(**json.loads(CODEGEN.read_text()))), 8, 256),
    "qwen2.5-coder-0.5b": (["--config_name", "qwen2.5-coder-0.5b", "--tokenizer_name", str(ROOT / "target/fixtures/tiny")],
                           lambda: Qwen2ForCausalLM(Qwen2Config(
                               vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                               num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                               rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True)), 1, 512),
}
FLAGS, MAKE_MODEL, MICRO, BLOCK = MODELS[MODEL]


def ours(data: Path, work: Path, steps: int) -> float:
    out = work / "ours"
    subprocess.run([str(ROOT / "target/debug/coordinator"), "train", *FLAGS, "--train_file", str(data), "--output_dir", str(out),
                    "--overwrite_output_dir", "--do_train", "--device", "cpu", "--block_size", str(BLOCK),
                    "--per_device_train_batch_size", str(MICRO), "--learning_rate", "1e-3", "--max_steps", str(steps),
                    "--logging_steps", str(steps), "--save_steps", "0", "--cache_dir", str(work / "cache")],
                   check=True, capture_output=True)
    # The coordinator's rate counts the tokens after the first step's report over the time since.
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    return last["tokens_per_second"]


def pytorch(steps: int) -> float:
    torch.manual_seed(0)
    model = MAKE_MODEL().train()
    config = model.config
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (steps - s) / steps))
    start = None
    for step in range(steps):
        ids = torch.randint(0, config.vocab_size, (MICRO, BLOCK))
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if step == 0:
            start = time.perf_counter()
    return (steps - 1) * MICRO * BLOCK / (time.perf_counter() - start)


def main(data: Path, work: Path, steps: int):
    ours_tps = ours(data, work, steps)
    torch_tps = pytorch(steps)
    print(f"\nCPU training, {torch.get_num_threads()} torch threads, {MODEL} shape, block {BLOCK}, micro {MICRO}, {steps} steps")
    print("| trainer | tokens/s (steady state) |")
    print("|---|---|")
    print(f"| zerotune coordinator + worker (tch, host AdamW) | {ours_tps:,.0f} |")
    print(f"| PyTorch + HF transformers ({MODEL}) + fused AdamW (baseline) | {torch_tps:,.0f} |")
    print(f"ratio: {ours_tps / torch_tps:.2f}x")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 40)
