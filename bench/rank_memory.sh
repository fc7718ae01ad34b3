#!/usr/bin/env bash
# Memory of one training rank on CPU: the codegen-350M shape, ZeRO-2 with the optimizer offloaded,
# world size 1, block 128, micro 2, 2 steps of accumulation 2, with and without
# --gradient_checkpointing: its peak RSS (the largest process of the job's tree, the worker, as
# /usr/bin/time reports it) next to the memory planner's total for the same flags
# (`coordinator estimate`) and the floor of its state (params, their gradients, the fp32
# gradient accumulator, fp32 master + Adam moments). On a CPU rank "device" and host memory are
# the same RAM, so every buffer counts once.
#   DTYPE=fp32|bf16 (default fp32, the CPU default)   CONFIG=codegen-350M   BLOCK=128   MICRO=2   STEPS=2
#   BASELINE_BIN=DIR: also run DIR/coordinator (another build), without checkpointing
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
DTYPE=${DTYPE:-fp32}
CONFIG=${CONFIG:-codegen-350M}
BLOCK=${BLOCK:-128}
MICRO=${MICRO:-2}
STEPS=${STEPS:-2}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
target/debug/coordinator files2jsonl . "$WORK/data.jsonl" --exclude 'runs/**' >/dev/null
echo '{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}, "train_batch_size": "auto", "gradient_accumulation_steps": "auto"}' > "$WORK/ds.json"
# The fixtures' tokenizer (1101 ids) keeps the model's 51200 embedding rows (a trained one would
# size them to itself).
[ -f target/fixtures/tokenizer-big/tokenizer.json ] || .venv/bin/python tests/fixtures/make_fixtures.py target/fixtures >/dev/null
flags=(--config_name "$CONFIG" --tokenizer_name target/fixtures/tokenizer-big --train_file "$WORK/data.jsonl" --do_train --device cpu
  --deepspeed "$WORK/ds.json" --block_size "$BLOCK" --per_device_train_batch_size "$MICRO" --gradient_accumulation_steps 2
  --max_steps "$STEPS" --save_steps 0 --logging_steps 1 --cache_dir "$WORK/cache")
[ "$DTYPE" = bf16 ] && flags+=(--bf16)

gib() { awk -v b="$1" 'BEGIN {printf "%.2f", b / 2^30}'; }
peak_bytes() { # BIN_DIR NAME EXTRA_FLAGS...: runs the job, prints its peak RSS in bytes and its wall seconds
  local bin=$1 name=$2; shift 2
  local start=$SECONDS
  /usr/bin/time -f %M -o "$WORK/$name.rss" "$bin/coordinator" train "${flags[@]}" "$@" --output_dir "$WORK/$name" > "$WORK/$name.log" 2>&1 ||
    { tail -5 "$WORK/$name.log" >&2; exit 1; }
  echo "$(( $(cat "$WORK/$name.rss") * 1024 )) $(( SECONDS - start ))"
}
planned_bytes() { # EXTRA_FLAGS...: the planner's per-rank total
  target/debug/coordinator estimate "${flags[@]}" "$@" --output_dir "$WORK/estimate" | sed -n 's/.*total per CPU rank.*(\([0-9]*\) bytes).*/\1/p'
}

params=$(target/debug/coordinator estimate "${flags[@]}" --output_dir "$WORK/estimate" | sed -n 's/^memory plan: \([0-9]*\) parameters.*/\1/p')
width=$([ "$DTYPE" = bf16 ] && echo 2 || echo 4)
floor=$(awk -v n="$params" -v w="$width" 'BEGIN {printf "%.0f", n * (w + w + 4 + 12)}')
echo
echo "One CPU rank, $CONFIG shape ($params params), $DTYPE, ZeRO-2 + offload, world 1, block $BLOCK, micro $MICRO, accumulation 2, $STEPS steps ($(nproc) cores)"
echo "| run | peak RSS GiB | planner GiB | planner / measured | wall s |"
echo "|---|---|---|---|---|"
echo "| state floor: params + their gradients ($width+$width B) + fp32 accumulator (4 B) + master and moments (12 B) per param | $(gib "$floor") | - | - | - |"
for ckpt in false true; do
  read -r measured secs < <(peak_bytes target/debug "ckpt-$ckpt" --gradient_checkpointing "$ckpt")
  planned=$(planned_bytes --gradient_checkpointing "$ckpt")
  label=$([ "$ckpt" = true ] && echo "zerotune, --gradient_checkpointing" || echo "zerotune")
  echo "| $label | $(gib "$measured") | $(gib "$planned") | $(awk -v p="$planned" -v m="$measured" 'BEGIN {printf "%.3f", p / m}') | $secs |"
done
if [ -n "${BASELINE_BIN:-}" ]; then
  read -r base secs < <(peak_bytes "$BASELINE_BIN" baseline)
  echo "| zerotune ($BASELINE_BIN) | $(gib "$base") | - | - | $secs |"
fi
