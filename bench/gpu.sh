#!/usr/bin/env bash
# GPU checks and benchmark in one call (prepare with bench/gpu_prepare.sh on the build machine).
# PART=main (default; one device call, about 7 minutes):
# 1. CUDA correctness: greedy ids of the tiny fixture on cuda equal those on cpu (both fp32), and
#    worker serve on cuda answers one request and 8 concurrent ones with that text; ZeRO-2 over NCCL
#    equals CPU training (fp32); the offloaded step's 16-bit gradients keep the updates (bf16, fp16),
#    in tiles of 1000 elements so transfers are in flight during host updates, with the fp16 runs'
#    skipped (overflow) steps beside; HostOptimizer::step on cuda bit-equal to cpu
#    (examples/offload_check.rs); gradient checkpointing on cuda gives the weights of the plain run.
# 2. Training throughput and peak GPU memory, codegen-350M-multi shape from scratch, block 2048,
#    micro 1, accumulation 8 (the fixture's tokenizer keeps the 51200 embedding rows DeepSpeed's
#    model has): zerotune (ZeRO-2 + CPU offload, world size 1) in fp16 and bf16 next to
#    the memory planner's total, and DeepSpeed ZeRO-2 + offload (.gpu/anchor from ANCHOR in
#    bench/gpu_prepare.sh, the seed's config) in the same call; skipped when .gpu/anchor is absent.
# PART=big (a second call): the largest CodeGen shape (16B, 6B, 2B: the first the planner accepts
#    for this GPU and host) trained with offload + --gradient_checkpointing, bf16, block 2048, its
#    tokens/s and peak memory beside the planner's; DeepSpeed on the 2B shape (the anchor's largest).
# Peak memory is sampled with nvidia-smi for both (process total), and DeepSpeed's own
# torch.cuda.max_memory_allocated is shown too.
# Dry run on a machine without a GPU: DEVICE=cpu CONFIG=tiny BLOCK=64 DTYPES=bf16 PY=.venv/bin/python
#   TORCH_LIB=.libtorch/torch/lib bash bench/gpu.sh (and PART=big BIG_CONFIGS="codegen-350M tiny").
set -uo pipefail
cd "$(dirname "$0")/.."
# Runs, models and logs go to $WORK (bulky, left on the machine); $OUT gets two files back: the
# summary table (summary-$PART.md) and the logs, each cut to its last 200 kB (logs-$PART.txt).
OUT=${OUT:-/tmp/gpu-out}; WORK=${WORK:-/tmp/zerotune-gpu}
rm -rf "$WORK"; mkdir -p "$OUT" "$WORK"
TORCH_LIB=${TORCH_LIB:-/opt/torch/.venv/lib/python3.12/site-packages/torch/lib}
PY=${PY:-/opt/torch/.venv/bin/python}
DEVICE=${DEVICE:-cuda}
CONFIG=${CONFIG:-codegen-350M}
BLOCK=${BLOCK:-2048}
STEPS=${STEPS:-8}
DTYPES=${DTYPES:-fp16 bf16}
PART=${PART:-main}
ANCHOR=${ANCHOR_SPECS:-$([ -d .gpu/anchor ] && echo 1 || echo 0)}
export LD_LIBRARY_PATH="$TORCH_LIB:${LD_LIBRARY_PATH:-}"
BIN=$PWD/.gpu/bin
declare -A TINY
if [ "$DEVICE" = cpu ]; then NUM_GPUS=""; else NUM_GPUS="--num_gpus 1"; fi
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"

sample_start() { (while :; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null; sleep 0.2; done) > "$1" & SAMPLER=$!; }
sample_stop() { kill "$SAMPLER" 2>/dev/null; wait "$SAMPLER" 2>/dev/null; sort -n "$1" | tail -1; }
planned_mib() { "$BIN/coordinator" estimate "$@" 2>&1 | grep -m1 'total per \(GPU\|CPU rank\)' | sed 's/.*(\([0-9]*\) bytes).*/\1/' | awk '{printf "%d", $1 / 1048576}'; }
skipped() { "$PY" -c 'import json,sys; print(sum(json.loads(l).get("skipped_steps", 0) for l in open(sys.argv[1])))' "$1/metrics.jsonl" 2>/dev/null || echo "?"; }
if [ "$DEVICE" = cpu ]; then GPU_FLAGS=(--device cpu --num_workers 1); else GPU_FLAGS=(--device cuda --num_gpus 1); fi
# The logs of this call into $OUT, each cut to its last 200 kB.
collect_logs() {
  for f in "$WORK"/*.log "$WORK"/*.err "$WORK"/*.json "$WORK"/*.txt; do
    case $f in */data.txt | */mem-*.txt | *"/*."*) continue ;; esac
    echo "==> ${f#"$WORK"/} <=="; tail -c 200000 "$f"; echo
  done > "$OUT/logs-$PART.txt"
}
# Each section first brings the logs so far back to $OUT: a call cut short still returns them.
section() { collect_logs; echo "== $*"; }
trap collect_logs EXIT
# Stops a server: SIGTERM, which finishes its requests, then SIGKILL after 5 s.
stop_server() {
  kill "$1" 2>/dev/null
  for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$1" 2>/dev/null; wait "$1" 2>/dev/null
}
if [ "$PART" = big ]; then source bench/gpu_big.sh; exit; fi

section "1. CUDA greedy ids vs CPU (tiny fixture, fp32; then the GPU's default --dtype auto, shown)"
for run in "cpu fp32" "$DEVICE fp32" "$DEVICE auto"; do
  set -- $run
  "$BIN/worker" generate --model .gpu/fixtures/tiny --prompt $'def add(a, b):\n' --max_new_tokens 20 --device "$1" --dtype "$2" --json \
    > "$WORK/generate-$1-$2.json" 2> "$WORK/generate-$1-$2.err" || cat "$WORK/generate-$1-$2.err"
done
# The prompt the serve check sends next, extending the first (the prefix cache's several-token continuation).
"$BIN/worker" generate --model .gpu/fixtures/tiny --prompt $'def add(a, b):\n    return a' --max_new_tokens 20 --device "$DEVICE" \
  --dtype fp32 --json > "$WORK/generate-extended.json" 2> "$WORK/generate-extended.err" || cat "$WORK/generate-extended.err"
if cmp -s "$WORK/generate-cpu-fp32.json" "$WORK/generate-$DEVICE-fp32.json"; then GEN=same; else GEN=DIFFERENT; fi
echo "greedy ids cpu vs $DEVICE (fp32): $GEN"; cat "$WORK/generate-$DEVICE-fp32.json" "$WORK/generate-$DEVICE-auto.json"

section "1b. worker serve on $DEVICE (tiny fixture, fp32): one request, 8 at once, then one extending it (from the prefix cache), against generate's greedy text"
"$BIN/worker" serve --model .gpu/fixtures/tiny --device "$DEVICE" --dtype fp32 --port 0 2> "$WORK/serve.err" & SERVER=$!
for _ in $(seq 150); do grep -q '^serving' "$WORK/serve.err" || ! kill -0 "$SERVER" 2>/dev/null && break; sleep 0.2; done # listening, or gone
URL=$(sed -n 's/^serving .* at \(http[^ ]*\) .*/\1/p' "$WORK/serve.err")
SERVE=$("$PY" - "$URL" "$WORK/generate-$DEVICE-fp32.json" "$WORK/generate-extended.json" <<'PYEOF' 2>&1 | tail -1
import json, sys, urllib.request
from concurrent.futures import ThreadPoolExecutor
url = sys.argv[1] + "/engines/codegen/completions"
expected, extended = (json.load(open(path))["completion"] for path in sys.argv[2:4])
def complete(prompt):
    body = json.dumps({"model": "fastertransformer", "prompt": prompt, "max_tokens": 20, "temperature": 0}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(request, timeout=60))["choices"][0]["text"]
alone = complete("def add(a, b):\n")
with ThreadPoolExecutor(8) as pool:
    together = list(pool.map(complete, ["def add(a, b):\n"] * 8))
longer = complete("def add(a, b):\n    return a")
same = alone == expected and all(t == expected for t in together) and longer == extended
print("same as generate" if same else "DIFFERENT: %r alone, %r together, %r extended; generate: %r, %r" % (alone, together, longer, expected, extended))
PYEOF
)
stop_server "$SERVER"
echo "serve on $DEVICE: $SERVE"

section "2. data"
"$PY" - "$WORK/data.txt" <<'PYEOF'
import random, sys
random.seed(0)
words = ["".join(random.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(random.randint(2, 9))) for _ in range(5000)]
lines = [f"def {random.choice(words)}({', '.join(random.sample(words, 3))}):\n    return {' + '.join(random.sample(words, 4))}\n"
         for _ in range(60000)]
open(sys.argv[1], "w").write("".join(lines))
PYEOF
cat > "$WORK/ds_config.json" <<'JSON'
{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": true},
  "overlap_comm": true, "reduce_scatter": true, "contiguous_gradients": true},
 "fp16": {"enabled": "auto", "initial_scale_power": 16}, "bf16": {"enabled": "auto"},
 "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
 "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto"}
JSON

section "3. ZeRO-2 over NCCL (--num_gpus 1) on the tiny fixture, fp32: GPU vs CPU final weights"
TINY_ARGS=(--model_name_or_path .gpu/fixtures/tiny --train_file "$WORK/data.txt" --do_train --block_size 64
  --per_device_train_batch_size 2 --gradient_accumulation_steps 4 --save_steps 0 --learning_rate 1e-3
  --weight_decay 0.1 --adam_epsilon 1e-6 --logging_steps 1 --overwrite_output_dir)
for offload in cpu none; do
  printf '{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "%s"}}}' "$offload" > "$WORK/ds-tiny-$offload.json"
  "$BIN/coordinator" train "${TINY_ARGS[@]}" --max_steps 8 --warmup_steps 2 --device cpu --num_workers 1 --deepspeed "$WORK/ds-tiny-$offload.json" \
    --output_dir "$WORK/tiny-cpu-$offload" > "$WORK/tiny-cpu-$offload.log" 2>&1 || tail -3 "$WORK/tiny-cpu-$offload.log"
  "$BIN/coordinator" train "${TINY_ARGS[@]}" --max_steps 8 --warmup_steps 2 "${GPU_FLAGS[@]}" --deepspeed "$WORK/ds-tiny-$offload.json" \
    --output_dir "$WORK/tiny-gpu-$offload" > "$WORK/tiny-gpu-$offload.log" 2>&1 || tail -3 "$WORK/tiny-gpu-$offload.log"
  TINY[$offload]=$("$PY" - "$WORK/tiny-gpu-$offload/model.safetensors" "$WORK/tiny-cpu-$offload/model.safetensors" <<'PYEOF' 2>&1 | tail -1
import sys
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
print("%.2e" % max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in b))
PYEOF
)
  echo "offload $offload: GPU (NCCL) vs CPU final weights rel ${TINY[$offload]}"
done

section "3b. 16-bit gradient transfer: offloaded step (16-bit gradients down, tiles of 1000) vs device AdamW (fp32 gradients)"
# Two steps from the tiny fixture (Adam's first is sign-like, so the second shows the rounding):
# the weight updates must agree within two unit roundoffs of the format in the 2-norm, as
# worker/tests/numerics.rs checks on CPU. Tiles of 1000 elements (the fixture has ~0.2M) keep
# copies in flight while the host updates the neighbouring tile. An fp16 step skipped for
# overflow (the loss scale starts at 2^16) updates nothing, so the comparison is void, not failed.
declare -A SIXTEEN SKIPPED
SIXTEEN_TYPES=(bf16); [ "$DEVICE" = cpu ] || SIXTEEN_TYPES+=(fp16) # fp16 needs a GPU
for dt in "${SIXTEEN_TYPES[@]}"; do
  for offload in cpu none; do
    printf '{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "%s"}}}' "$offload" > "$WORK/ds-16-$offload.json"
    "$BIN/coordinator" train "${TINY_ARGS[@]}" --max_steps 2 --warmup_steps 0 --"$dt" "${GPU_FLAGS[@]}" --offload_tile_elements 1000 \
      --deepspeed "$WORK/ds-16-$offload.json" --output_dir "$WORK/sixteen-$dt-$offload" > "$WORK/sixteen-$dt-$offload.log" 2>&1 ||
      tail -3 "$WORK/sixteen-$dt-$offload.log"
  done
  SKIPPED[$dt]="skipped steps: offloaded $(skipped "$WORK/sixteen-$dt-cpu"), device $(skipped "$WORK/sixteen-$dt-none")"
  SIXTEEN[$dt]=$("$PY" - "$WORK/sixteen-$dt-cpu" "$WORK/sixteen-$dt-none" .gpu/fixtures/tiny "$dt" <<'PYEOF' 2>&1 | tail -1
import sys
import torch
from safetensors.torch import load_file
host, device, init = (load_file(f"{d}/model.safetensors") for d in sys.argv[1:4])
dh = torch.cat([(host[k].double() - init[k].double()).flatten() for k in init])
dd = torch.cat([(device[k].double() - init[k].double()).flatten() for k in init])
rel = ((dh - dd).norm() / dd.norm()).item()
limit = 2 * 2.0 ** (-9 if sys.argv[4] == "bf16" else -12)
print("%.2e (limit %.1e: %s)" % (rel, limit, "ok" if rel < limit else "FAIL"))
PYEOF
)
  case "${SKIPPED[$dt]}" in *"offloaded 0, device 0"*) ;; *) SIXTEEN[$dt]="${SIXTEEN[$dt]%%:*}: void, a step was skipped)" ;; esac
  echo "$dt: update rel ${SIXTEEN[$dt]}, ${SKIPPED[$dt]}"
done

section "3c. HostOptimizer::step on $DEVICE vs cpu, fixed random gradients, tiles of 1000 (fp32, bf16, fp16)"
"$BIN/offload_check" "$DEVICE" cpu 100003 1000 > "$WORK/offload_check.log" 2>&1; OFFLOAD_CHECK=$([ $? = 0 ] && echo bit-equal || echo FAIL)
cat "$WORK/offload_check.log"

section "3d. --gradient_checkpointing on $DEVICE: the plain run's weights (tiny fixture, fp32, 4 steps)"
for ckpt in false true; do
  "$BIN/coordinator" train "${TINY_ARGS[@]}" --max_steps 4 --warmup_steps 1 "${GPU_FLAGS[@]}" --gradient_checkpointing "$ckpt" \
    --deepspeed "$WORK/ds-tiny-cpu.json" --output_dir "$WORK/ckpt-$ckpt" > "$WORK/ckpt-$ckpt.log" 2>&1 || tail -3 "$WORK/ckpt-$ckpt.log"
done
CKPT=$("$PY" - "$WORK/ckpt-true/model.safetensors" "$WORK/ckpt-false/model.safetensors" <<'PYEOF' 2>&1 | tail -1
import sys
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
rel = max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in b)
print("%.2e (%s)" % (rel, "ok" if rel < 1e-5 else "FAIL"))
PYEOF
)
echo "checkpointing vs plain final weights rel $CKPT"

declare -A TPS MEM PLAN
for dt in $DTYPES; do
  section "4. zerotune $dt"
  RUN_ARGS=(--config_name "$CONFIG" $NUM_GPUS --tokenizer_name .gpu/fixtures/tiny --train_file "$WORK/data.txt" \
    --output_dir "$WORK/run-$dt" --overwrite_output_dir --do_train --device "$DEVICE" --"$dt" \
    --deepspeed "$WORK/ds_config.json" --block_size "$BLOCK" --per_device_train_batch_size 1 \
    --gradient_accumulation_steps 8 --max_steps "$STEPS" --logging_steps "$STEPS" --save_steps 100000 \
    --learning_rate 2e-5 --max_grad_norm 1.0)
  PLAN[$dt]=$(planned_mib "${RUN_ARGS[@]}")
  sample_start "$WORK/mem-ours-$dt.txt"
  timeout 200 "$BIN/coordinator" train "${RUN_ARGS[@]}" > "$WORK/ours-$dt.log" 2>&1; rc=$?
  MEM[$dt]=$(sample_stop "$WORK/mem-ours-$dt.txt")
  tail -3 "$WORK/ours-$dt.log"
  TPS[$dt]=$(tail -1 "$WORK/run-$dt/metrics.jsonl" 2>/dev/null | "$PY" -c 'import json,sys; print(round(json.loads(sys.stdin.read())["tokens_per_second"]))' 2>/dev/null || echo "failed rc=$rc")
done

declare -A DS DSMEM
if [ "$ANCHOR" = 1 ]; then
  for dt in fp16 bf16; do
    section "5. DeepSpeed $dt"
    sample_start "$WORK/mem-ds-$dt.txt"
    bash .gpu/anchor/run.sh "$PWD/.gpu/anchor/wheels" "200 ds --dtype $dt --micro 1 --ga 8 --steps 3 --warmup 1" > "$WORK/ds-$dt.log" 2>&1
    DSMEM[$dt]=$(sample_stop "$WORK/mem-ds-$dt.txt")
    cat "$WORK/ds-$dt.log"
    DS[$dt]=$(grep RESULT "$WORK/ds-$dt.log" | sed 's/RESULT //' | "$PY" -c 'import json,sys; r=json.loads(sys.stdin.read()); print(round(r["tokens_per_s"]), "%.1f" % r["peak_gpu_gib"])' 2>/dev/null || echo "failed -")
  done
fi

echo
{
echo "greedy ids, tiny fixture fp32, cpu vs $DEVICE: $GEN"
echo "worker serve on $DEVICE, tiny fixture fp32, 1 request, 8 concurrent, 1 extending them (prefix cache), greedy text vs generate: $SERVE"
echo "ZeRO-2 --num_gpus 1 (NCCL) vs CPU, tiny fixture fp32, 8 steps, final weights rel: offload cpu ${TINY[cpu]}, offload none ${TINY[none]}"
echo "16-bit gradient transfer, tiny fixture, 2 steps, tiles of 1000, offloaded vs device AdamW updates: bf16 ${SIXTEEN[bf16]} (${SKIPPED[bf16]}), fp16 ${SIXTEEN[fp16]:--} (${SKIPPED[fp16]:-not run})"
echo "HostOptimizer::step $DEVICE vs cpu (fp32, bf16, fp16; tiles of 1000): $OFFLOAD_CHECK"
echo "--gradient_checkpointing vs plain, tiny fixture fp32, 4 steps, final weights rel: $CKPT"
echo "| run ($CONFIG shape, block $BLOCK, micro 1, accumulation 8) | tokens/s | peak GPU MiB (nvidia-smi) | planner MiB | torch max allocated GiB |"
echo "|---|---|---|---|---|"
for dt in $DTYPES; do
  echo "| zerotune ZeRO-2 + CPU offload (NCCL, --num_gpus 1), $dt | ${TPS[$dt]} | ${MEM[$dt]:--} | ${PLAN[$dt]:--} | - |"
  [ "$ANCHOR" = 1 ] && set -- ${DS[$dt]} && echo "| DeepSpeed ZeRO-2 + CPU offload, $dt | $1 | ${DSMEM[$dt]:--} | - | $2 |"
done
} | tee "$OUT/summary-$PART.md"
collect_logs
