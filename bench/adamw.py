"""CPU AdamW step: ours (worker/examples/adamw_bench.rs, printed RESULT line) vs torch.optim.AdamW
foreach and fused on the same number of fp32 parameters and threads, and two memory-bandwidth
floors: a triad scaled to 28 bytes/param, and AdamW's own loads and stores without its arithmetic.
Then the whole offloaded step (unscale/clip, AdamW, bf16 down-cast): ours in one pass vs torch's
three ops. Prints two tables.

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


def torch_offload_rate():
    """The same offloaded step with torch's ops: unscale/clip the gradient, fused AdamW, bf16 copy."""
    p = torch.nn.Parameter(torch.full((n,), 0.5))
    p.grad = ((torch.arange(n) % 1000).float() - 500.0) * 1e-4
    bf16 = torch.empty(n, dtype=torch.bfloat16)
    opt = torch.optim.AdamW([p], lr=1e-4, weight_decay=0.01, fused=True)

    def step():
        p.grad.mul_(0.999)
        opt.step()
        bf16.copy_(p.detach())

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
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

ours_offload, torch_offload = ours["zerotune_offload_params_per_s"], torch_offload_rate()
print("\nThe whole offloaded step (unscale and clip the fp32 gradient, AdamW, bf16 weights out), same params and threads")
print("| implementation | M params/s | vs torch |")
print("|---|---|---|")
print(f"| zerotune: one fused pass | {ours_offload / 1e6:.0f} | {ours_offload / torch_offload:.2f}x |")
print(f"| torch: grad.mul_, AdamW fused=True, bf16 copy_ | {torch_offload / 1e6:.0f} | 1.00x |")
