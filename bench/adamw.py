"""CPU AdamW step: ours (worker/examples/adamw_bench.rs, printed RESULT line) vs torch.optim.AdamW
foreach and fused on the same number of fp32 parameters and threads, and two memory-bandwidth
floors: a triad scaled to 28 bytes/param, and AdamW's own loads and stores without its arithmetic.
Prints a table.

    python bench/adamw.py OUR_RESULT_JSON
"""

import json
import sys
import time

import torch

ours = json.loads(sys.argv[1])
n, threads, steps = ours["params"], ours["threads"], 10
torch.set_num_threads(threads)


def torch_rate(**kind):
    p = torch.nn.Parameter(torch.full((n,), 0.5))
    p.grad = ((torch.arange(n) % 1000).float() - 500.0) * 1e-4
    opt = torch.optim.AdamW([p], lr=1e-4, weight_decay=0.01, **kind)
    opt.step()
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return n * steps / (time.perf_counter() - start)


rows = [("zerotune host AdamW (fused unscale/clip/decay)", ours["zerotune_params_per_s"]),
        ("torch.optim.AdamW foreach=True", torch_rate(foreach=True)),
        ("torch.optim.AdamW fused=True", torch_rate(fused=True))]
floor = ours["floor_params_per_s"]
pattern = ours["pattern_params_per_s"]
print(f"\nCPU AdamW step, {n / 1e6:.0f}M fp32 params, {threads} threads. Floors: triad {floor / 1e6:.0f} M params/s "
      f"({ours['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s / 28 bytes per param); AdamW's own access pattern with no "
      f"arithmetic (read p, m, v, g; write p, m, v) {pattern / 1e6:.0f} M params/s")
print("| optimizer | M params/s | vs torch fused | % of triad floor | % of access-pattern floor |")
print("|---|---|---|---|---|")
fused = rows[2][1]
for name, rate in rows:
    print(f"| {name} | {rate / 1e6:.0f} | {rate / fused:.2f}x | {100 * rate / floor:.0f}% | {100 * rate / pattern:.0f}% |")
