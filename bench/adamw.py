"""CPU AdamW step: ours (worker/examples/adamw_bench.rs, printed RESULT line) vs torch.optim.AdamW
foreach and fused on the same number of fp32 parameters and threads, and two memory-bandwidth
floors: a triad scaled to 28 bytes/param, and AdamW's own loads and stores without its arithmetic.
Then the whole offloaded step as bf16 training runs it (bf16 gradients widened, unscaled and
clipped; AdamW; bf16 weights out): ours in one pass vs torch's three ops. Prints two tables.

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
    """The same offloaded step with torch's fastest ops here: widen the bf16 gradient into the fp32
    one, fused AdamW with the unscale/clip factor as its grad_scale (as GradScaler passes it), bf16
    copy. (torch.mul(bf16, s, out=fp32) instead of the first two was 2.3x slower here.)"""
    p = torch.nn.Parameter(torch.full((n,), 0.5))
    grad_bf16 = (((torch.arange(n) % 1000).float() - 500.0) * 1e-4).bfloat16()
    p.grad = torch.empty(n)
    bf16 = torch.empty(n, dtype=torch.bfloat16)
    opt = torch.optim.AdamW([p], lr=1e-4, weight_decay=0.01, fused=True)
    opt.grad_scale = torch.tensor(2.0)  # fused AdamW divides the gradient by it

    def step():
        p.grad.copy_(grad_bf16)
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
print("\nThe whole offloaded step (bf16 gradient widened, unscaled and clipped; AdamW; bf16 weights out), same params and threads")
print("| implementation | M params/s | vs torch |")
print("|---|---|---|")
print(f"| zerotune: one fused pass | {ours_offload / 1e6:.0f} | {ours_offload / torch_offload:.2f}x |")
print(f"| torch: fp32 grad copy_ of the bf16 one, AdamW fused=True with grad_scale, bf16 copy_ | {torch_offload / 1e6:.0f} | 1.00x |")
