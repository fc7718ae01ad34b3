#!/usr/bin/env bash
# Sets up everything (scripts/setup.sh --test), regenerates the HF reference fixtures, and runs
# the whole test suite. `.ci/run` runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh --test
export ZEROTUNE_PYTHON="$PWD/.venv/bin/python"
export ZEROTUNE_FIXTURES="$PWD/target/fixtures"
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore
rm -rf "$ZEROTUNE_FIXTURES"
"$ZEROTUNE_PYTHON" tests/fixtures/make_fixtures.py "$ZEROTUNE_FIXTURES"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --no-fail-fast -- "$@" 2>&1 | tee "$log" || status=$?
# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed/) p += $(i - 1); if ($(i) ~ /^failed/) f += $(i - 1) } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
