"""Data preparation throughput: JSON Lines of source files -> token blocks on disk.

ours:     `coordinator tokenize` (read, split by documents, parallel tokenisation, EOS-joined
          blocks, u16 token cache), cold cache, as a subprocess.
baseline: the same work in Python with HF `tokenizers` batch encoding (Rust, parallel) + numpy.
Same JSONL, same tokenizer, same block size, same machine, same run. Best of 2 each.

    .venv/bin/python bench/data_prep.py DATA.jsonl WORKDIR
"""

import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BLOCK = 1024
VOCAB = 16384


def train_tokenizer(texts, out: Path) -> Path:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts[:2000], trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return out


def python_baseline(data: Path, tok_path: Path, out: Path) -> float:
    t0 = time.perf_counter()
    texts = [json.loads(line)["text"] for line in data.open(encoding="utf-8") if line.strip()]
    order = list(range(len(texts)))
    random.Random(42).shuffle(order)
    n_val = max(1, round(len(texts) * 0.05))
    val_ids = set(order[:n_val])
    tok = Tokenizer.from_file(str(tok_path))
    eos = tok.token_to_id("<|endoftext|>")
    blocks = []
    for split in ([t for i, t in enumerate(texts) if i not in val_ids], [t for i, t in enumerate(texts) if i in val_ids]):
        ids = []
        for enc in tok.encode_batch(split, add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(eos)
        n = len(ids) // BLOCK * BLOCK
        blocks.append(np.asarray(ids[:n], dtype=np.uint16))
    np.concatenate(blocks).tofile(out)
    return time.perf_counter() - t0


def ours(coordinator: Path, data: Path, tok_dir: Path) -> float:
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        subprocess.run([str(coordinator), "tokenize", "--train_file", str(data), "--tokenizer_name", str(tok_dir),
                        "--block_size", str(BLOCK), "--cache_dir", cache], check=True, capture_output=True)
        return time.perf_counter() - t0


def main(data: Path, work: Path):
    coordinator = Path(__file__).resolve().parent.parent / "target/debug/coordinator"
    texts = [json.loads(line)["text"] for line in data.open(encoding="utf-8") if line.strip()]
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    tok_dir = train_tokenizer(texts, work / "tokenizer")
    ours_s = min(ours(coordinator, data, tok_dir) for _ in range(2))
    py_s = min(python_baseline(data, tok_dir / "tokenizer.json", work / "py.u16") for _ in range(2))
    print(f"\ndata preparation: {len(texts)} files, {mb:.1f} MB of text, block {BLOCK}, BPE vocab {VOCAB}")
    print("| pipeline | seconds | MB/s |")
    print("|---|---|---|")
    print(f"| zerotune `coordinator tokenize` | {ours_s:.2f} | {mb / ours_s:.1f} |")
    print(f"| Python HF tokenizers encode_batch + numpy (baseline) | {py_s:.2f} | {mb / py_s:.1f} |")
    print(f"speed-up: {py_s / ours_s:.2f}x")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
