#!/usr/bin/env bash
# Convert benchmark (issue 3): 350M-shape fp16 .bin -> Triton dir, tp 1 and 2, vs the copy floor.
# Needs ~6 GB free under WORK (default: a temporary directory, removed afterwards).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
WORK=${WORK:-$(mktemp -d)}
[ -n "${KEEP:-}" ] || trap 'rm -rf "$WORK"' EXIT
PYTHONWARNINGS=ignore .venv/bin/python bench/convert.py "$PWD/target/debug/convert" "$WORK"
