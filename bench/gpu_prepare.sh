#!/usr/bin/env bash
# Fills .gpu/ (git-ignored, carried to the GPU machine): stripped binaries, the tiny HF fixture,
# and, when ANCHOR=DIR names it, the DeepSpeed baseline with its wheels (docs/toolchain.md).
# Then, on the GPU machine:
#   bash bench/gpu.sh            (checks and the 350M comparison; logs under $OUT, the table last)
#   PART=big bash bench/gpu.sh   (the largest shape with offload + checkpointing; a second call)
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
du -sh .gpu
