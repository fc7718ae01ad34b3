#!/usr/bin/env bash
# Sets up everything (scripts/setup.sh --test), regenerates the HF reference fixtures, and runs
# the whole test suite. `.ci/run` runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh --test
export ZEROTUNE_PYTHON="$PWD/.venv/bin/python"
export ZEROTUNE_FIXTURES="$PWD/target/fixtures"
PYTHONWARNINGS=ignore HF_HUB_OFFLINE=1 "$ZEROTUNE_PYTHON" tests/fixtures/make_fixtures.py "$ZEROTUNE_FIXTURES" 2>&1 | grep -v "Writing model shards" || true
[[ -f "$ZEROTUNE_FIXTURES/meta.json" ]] || { echo "test: fixture generation failed" >&2; exit 1; }
HF_HUB_OFFLINE=1 cargo test --workspace -- "$@"
