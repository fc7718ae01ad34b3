#!/usr/bin/env bash
# Data preparation benchmark: a real source tree (libtorch's C++ headers, installed by setup) ->
# JSON Lines -> token blocks, ours vs Python HF tokenizers in the same run. Prints a table.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
SRC=${SRC:-.libtorch/torch/include}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
target/debug/coordinator files2jsonl "$SRC" "$WORK/data.jsonl"
PYTHONWARNINGS=ignore .venv/bin/python bench/data_prep.py "$WORK/data.jsonl" "$WORK"
