#!/usr/bin/env bash
# CPU AdamW benchmark (issue 4): ours vs torch.optim.AdamW (foreach, fused) on 100M fp32 params
# with the same threads, and the machine's memory-bandwidth floor. N=... to change the size.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
result=$(cargo run -q --example adamw_bench -p zerotune-worker -- "${N:-100000000}" 10 | grep RESULT | sed 's/RESULT //')
PYTHONWARNINGS=ignore .venv/bin/python bench/adamw.py "$result"
