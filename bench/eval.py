"""Completion evaluation speed on CPU: `worker eval` vs an HF `generate` loop over the same
positions and prompts, in the same run, same threads.

The codegen-350M shape with random weights (bench/serve.py makes it), fp32; documents are this
repository's Rust source. Every position decodes MAX_NEW tokens (the stand-in tokenizer has no
newline, so no prediction stops early, on either side).

    .venv/bin/python bench/eval.py WORKDIR [POSITIONS] [CONTEXT] [THREADS]

Prints a table of positions/s, and what bounds them: the prompts' prefill FLOPs against the
matmul rate measured here, and the decode steps' weight reads against the memory bandwidth.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import CodeGenForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import CONFIG, EOS, VOCAB, bandwidth_gbs, make_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MAX_NEW = 48


def matmul_gflops(threads: int) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(512, 1024), torch.randn(1024, 4096)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * 512 * 1024 * 4096 / best / 1e9


def main(work: Path, positions: int, context: int, threads: int):
    work.mkdir(parents=True, exist_ok=True)
    model_dir = make_model(work)
    docs = work / "docs.jsonl"
    files = sorted((ROOT / "coordinator/src").rglob("*.rs"))
    docs.write_text("".join(json.dumps({"text": f.read_text(), "url": str(f.relative_to(ROOT))}) + "\n" for f in files))
    out = work / "eval-out"

    run = subprocess.run([str(ROOT / "target/debug/worker"), "eval", "--model", str(model_dir), "--validation_file", str(docs),
                    "--output_dir", str(out), "--num_positions", str(positions), "--context_tokens", str(context),
                    "--max_new_tokens", str(MAX_NEW), "--device", "cpu", "--max_batch", "8"],
                   check=True, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    # "eval fine_tuned: N positions predicted in S s ..." (the prediction alone: no load, no loss)
    line = next(l for l in run.stderr.splitlines() if l.startswith("eval fine_tuned:"))
    ours = float(line.split(" predicted in ")[1].split(" s")[0])

    torch.set_num_threads(threads)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = {d["url"]: d["text"] for d in map(json.loads, docs.read_text().splitlines())}
    prompts = []
    for p in map(json.loads, (out / "predictions.jsonl").read_text().splitlines()):
        t = text[p["url"]]
        at = sum(len(line) + 1 for line in t.split("\n")[: p["line"] - 1])
        prompts.append(tok.encode(t[:at]).ids[-min(context, CONFIG["n_positions"] - MAX_NEW):])
    model = CodeGenForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    start = time.perf_counter()
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                           do_sample=False, pad_token_id=EOS)
    hf = time.perf_counter() - start

    n_params = sum(p.numel() for p in model.parameters())
    dense = n_params - VOCAB * CONFIG["n_embd"]  # the embedding is a lookup
    prompt_tokens = sum(len(p) for p in prompts)
    gflops, gbs = matmul_gflops(threads), bandwidth_gbs(threads)
    prefill_s = 2 * (dense - VOCAB * CONFIG["n_embd"]) * prompt_tokens / (gflops * 1e9)  # lm_head only on the last token
    decode_s = len(prompts) * MAX_NEW * dense * 4 / (gbs * 1e9)  # one weight read per token when alone
    print(f"\ncodegen-350M shape, random weights, fp32, CPU, {threads} threads; {len(prompts)} positions, "
          f"{prompt_tokens / len(prompts):.0f} prompt tokens each on average (--context_tokens {context}), {MAX_NEW} new tokens each.\n")
    print("| run | seconds | positions/s | vs HF |")
    print("|---|---|---|---|")
    print(f"| HF generate loop, one position at a time | {hf:.1f} | {len(prompts) / hf:.3f} | 1.00x |")
    print(f"| worker eval predictions, batch 8 (its own timing line) | {ours:.1f} | {len(prompts) / ours:.3f} | {hf / ours:.2f}x |")
    print(f"\n(Model loading is left out of both; worker eval also measured the held-out loss: {line.split('; ')[1]}.)")
    print(f"\nBounds, measured in this run: matmul {gflops:.0f} GFLOP/s -> prefill of all prompts >= {prefill_s:.1f} s; "
          f"memory {gbs:.1f} GB/s -> {len(prompts) * MAX_NEW} decode steps alone >= {decode_s:.1f} s "
          f"(batching shares a weight read among up to 8 positions: >= {decode_s / 8:.1f} s).")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(Path(args[0]), int(args[1]) if len(args) > 1 else 24, int(args[2]) if len(args) > 2 else 512,
         int(args[3]) if len(args) > 3 else 2)
