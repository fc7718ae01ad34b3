#!/usr/bin/env bash
# Fills .gpu/ (git-ignored, carried to the GPU machine): stripped binaries, the tiny HF fixture,
# and the DeepSpeed anchor with its wheels (../shared/anchors/gpu). Then, on the GPU machine:
#   bash bench/gpu.sh        (writes logs under $OUT, prints the table last)
set -euo pipefail
cd "$(dirname "$0")/.."
ANCHOR=${ANCHOR:-../shared/anchors/gpu}
cargo build --workspace --bins
rm -rf .gpu && mkdir -p .gpu/bin .gpu/fixtures
for b in coordinator worker convert; do strip -o ".gpu/bin/$b" "target/debug/$b"; done
cp -r target/fixtures/tiny .gpu/fixtures/
cp -r "$ANCHOR" .gpu/anchor
du -sh .gpu
