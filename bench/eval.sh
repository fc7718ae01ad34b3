#!/usr/bin/env bash
# Completion-evaluation speed on CPU: `worker eval` vs an HF `generate` loop on the same positions
# and prompts, codegen-350M shape (random weights), POSITIONS (24) positions with CONTEXT (512)
# prompt tokens at most, THREADS (2) threads, in the same run; prints the table of bench/eval.py.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
WORK=${WORK:-.bench-serve}
HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore \
    .venv/bin/python bench/eval.py "$WORK" "${POSITIONS:-24}" "${CONTEXT:-512}" "${THREADS:-2}"
