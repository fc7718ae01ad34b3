#!/usr/bin/env bash
# Serving benchmark on CPU: `worker serve` vs HF transformers `generate` on the codegen-350M shape, or
# SHAPE=qwen2.5-coder-0.5b (random weights, fp32), THREADS threads (2), in the same run; prints the
# tables of bench/serve.py.
# The random model (1.4 GB) is kept in WORK (default .bench-serve/) between runs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
WORK=${WORK:-.bench-serve}
HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore .venv/bin/python bench/serve.py "$WORK" "${THREADS:-2}"
