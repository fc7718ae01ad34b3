#!/usr/bin/env bash
# CPU training throughput benchmark: ours vs PyTorch + HF transformers in the same run. Prints a table.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
target/debug/coordinator files2jsonl . "$WORK/data.jsonl" --exclude 'runs/**' >/dev/null
PYTHONWARNINGS=ignore .venv/bin/python bench/cpu_train.py "$WORK/data.jsonl" "$WORK" "${STEPS:-40}"
