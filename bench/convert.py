"""Convert benchmark: a random-weight CodeGen of the real codegen-350M-multi shape, stored as an
fp16 pytorch_model.bin like the release, -> FauxPilot Triton dir with --tp 1 and --tp 2, next to
the floor on the same disk (read the same input bytes, write the same output bytes). Prints a
table of wall time and peak RSS; each command runs REPEAT times and the best is kept.

    python bench/convert.py CONVERT_BINARY WORK_DIR
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import CodeGenConfig, CodeGenForCausalLM

REPEAT = 2
convert, work = sys.argv[1], Path(sys.argv[2])
source = work / "codegen-350M-multi"
if not (source / "pytorch_model.bin").is_file():
    config = CodeGenConfig(n_layer=20, n_embd=1024, n_head=16, rotary_dim=32, vocab_size=51200, n_positions=2048,
                           n_ctx=2048, activation_function="gelu_new", tie_word_embeddings=False,
                           bos_token_id=1, eos_token_id=50256)
    torch.manual_seed(0)
    model = CodeGenForCausalLM(config).half()
    source.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), source / "pytorch_model.bin")
    config.save_pretrained(source)
    del model
in_bytes = (source / "pytorch_model.bin").stat().st_size


def run(argv, clean):
    """Wall seconds and peak RSS (GiB) of one process, started by /usr/bin/time (a child forked
    from this Python process would inherit its resident size in ru_maxrss)."""
    if Path(clean).is_dir():
        shutil.rmtree(clean)
    elif Path(clean).exists():
        os.remove(clean)
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M", *argv], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{argv} failed: {proc.stderr}")
    rss_kb = int(proc.stderr.rsplit("MAXRSS_KB", 1)[1])
    return wall, rss_kb / 2**20


def best(argv, clean):
    runs = [run(argv, clean) for _ in range(REPEAT)]
    return min(r[0] for r in runs), max(r[1] for r in runs)


def dir_bytes(d):
    return sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())


FLOOR = """
import sys
src, dst, out_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
chunk = 64 << 20
with open(src, 'rb') as f:
    data = [f.read(chunk) for _ in range(0, {in_bytes}, chunk)]
block = data[0]
with open(dst, 'wb') as g:
    left = out_bytes
    while left:
        n = min(left, len(block))
        g.write(block[:n])
        left -= n
"""

rows = []
for tp in (1, 2):
    store = work / f"store-tp{tp}"
    args = [convert, "triton", str(source), "--model_store", str(store), "--tp", str(tp)]
    wall, rss = best(args, store)
    out_bytes = dir_bytes(store / f"codegen-350M-multi-{tp}gpu")
    floor_wall, _ = best([sys.executable, "-c", FLOOR.replace("{in_bytes}", str(in_bytes)),
                          str(source / "pytorch_model.bin"), str(work / "floor.out"), str(out_bytes)], work / "floor.out")
    rows.append((tp, wall, rss, floor_wall, out_bytes))

print(f"\nconvert triton, codegen-350M-multi shape, fp16 .bin in ({in_bytes / 1e9:.2f} GB), fp32 FT out; "
      f"{os.cpu_count()} cores; best of {REPEAT}")
print("| tp | out GB | zerotune s | floor s (read in + write out) | ratio | zerotune peak RSS GiB |")
print("|---|---|---|---|---|---|")
for tp, wall, rss, floor_wall, out_bytes in rows:
    print(f"| {tp} | {out_bytes / 1e9:.2f} | {wall:.2f} | {floor_wall:.2f} | {wall / floor_wall:.2f}x | {rss:.2f} |")
