#!/usr/bin/env bash
# Data preparation benchmark: a real source tree (libtorch's C++ headers, installed by setup) ->
# JSON Lines -> token blocks, ours with data hygiene on and off vs Python HF tokenizers in the same
# run. Prints a table.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
SRC=${SRC:-.libtorch/torch/include}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# Plain JSONL (no hygiene here), so the tokenize rows below do all of it themselves.
target/debug/coordinator files2jsonl "$SRC" "$WORK/data.jsonl" --secrets keep --dedup none
PYTHONWARNINGS=ignore .venv/bin/python bench/data_prep.py "$WORK/data.jsonl" "$WORK"
