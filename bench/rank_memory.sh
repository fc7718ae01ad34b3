#!/usr/bin/env bash
# Memory of one training rank on CPU: the codegen-350M shape, ZeRO-2 with the optimizer offloaded,
# world size 1, 2 steps of accumulation 2 (block 128), its peak RSS (coordinator and worker, as
# /usr/bin/time reports the process tree) next to the floor of its state: 16-bit or fp32 params,
# their autograd gradients, the fp32 gradient accumulator and the fp32 master + Adam moments.
# On a CPU rank "device" and host memory are the same RAM, so every buffer counts once.
#   DTYPE=bf16|fp32 (default bf16)   BASELINE_BIN=DIR: also run DIR/coordinator (another build)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
DTYPE=${DTYPE:-bf16}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
target/debug/coordinator files2jsonl . "$WORK/data.jsonl" --exclude 'runs/**' >/dev/null
echo '{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}, "train_batch_size": "auto", "gradient_accumulation_steps": "auto"}' > "$WORK/ds.json"
flags=(train --config_name codegen-350M --train_tokenizer 2048 --train_file "$WORK/data.jsonl" --do_train --device cpu
  --deepspeed "$WORK/ds.json" --block_size 128 --per_device_train_batch_size 1 --gradient_accumulation_steps 2
  --max_steps 2 --save_steps 0 --logging_steps 1 --cache_dir "$WORK/cache")
[ "$DTYPE" = bf16 ] && flags+=(--bf16)

peak_gib() { # BIN_DIR NAME: runs the job, prints its peak RSS in GiB
  /usr/bin/time -f %M -o "$WORK/$2.rss" "$1/coordinator" "${flags[@]}" --output_dir "$WORK/$2" > "$WORK/$2.log" 2>&1 ||
    { tail -5 "$WORK/$2.log" >&2; exit 1; }
  awk '{printf "%.2f", $1 / 1048576}' "$WORK/$2.rss"
}

params=356712448 # codegen-350M-multi (hf/src/config.rs checks the count)
width=$([ "$DTYPE" = bf16 ] && echo 2 || echo 4)
floor=$(awk -v n="$params" -v w="$width" 'BEGIN {printf "%.2f", n * (w + w + 4 + 12) / 2^30}')
echo
echo "One CPU rank, codegen-350M shape ($params params), $DTYPE, ZeRO-2 + offload, world 1, block 128, micro 1, accumulation 2"
echo "| run | peak RSS GiB | vs state floor |"
echo "|---|---|---|"
echo "| state floor: params + their gradients ($width+$width B) + fp32 accumulator (4 B) + master and moments (12 B) per param | $floor | 1.00x |"
ours=$(peak_gib target/debug ours)
echo "| zerotune (this build) | $ours | $(awk -v a="$ours" -v f="$floor" 'BEGIN {printf "%.2fx", a / f}') |"
if [ -n "${BASELINE_BIN:-}" ]; then
  base=$(peak_gib "$BASELINE_BIN" baseline)
  echo "| zerotune ($BASELINE_BIN) | $base | $(awk -v a="$base" -v f="$floor" 'BEGIN {printf "%.2fx", a / f}') |"
fi
