#!/usr/bin/env bash
# Fills .gpu/ (git-ignored, carried to the GPU machine): stripped binaries, the tiny HF fixture,
# and, when ANCHOR=DIR names it, the DeepSpeed baseline with its wheels (docs/toolchain.md).
# Then, on the GPU machine (carrying .gpu):
#   bash bench/gpu.sh            (checks and the 350M comparison; the table last, and in $OUT
#                                 summary-main.md and logs-main.txt)
#   PART=big bash bench/gpu.sh   (the largest shape with offload + checkpointing; a second call)
# Last, it checks that what a device call carries (the working tree and .gpu) is under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
ANCHOR=${ANCHOR:-}
cargo build --workspace --bins
cargo build --example offload_check -p zerotune-worker
rm -rf .gpu && mkdir -p .gpu/bin .gpu/fixtures
for b in coordinator worker; do strip -o ".gpu/bin/$b" "target/debug/$b"; done
strip -o .gpu/bin/offload_check target/debug/examples/offload_check
cp -r target/fixtures/tiny .gpu/fixtures/
if [ -n "$ANCHOR" ]; then
  cp -r "$ANCHOR" .gpu/anchor
else
  echo "note: no ANCHOR=DIR given: bench/gpu.sh will skip the DeepSpeed baseline (docs/toolchain.md)"
fi
tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
gpu=$(du -sb .gpu | cut -f1)
echo "carried: working tree $((tree >> 20)) MiB + .gpu $((gpu >> 20)) MiB (a device call takes 64 MiB at most)"
if (( tree + gpu >= 64 << 20 )); then echo "too large to carry: trim .gpu or the untracked files" >&2; exit 1; fi
