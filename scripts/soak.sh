#!/usr/bin/env bash
# Runs the fault, launcher, real-Slurm, server and failure-table tests (and the driver's blame unit tests) N times with a
# CPU hog beside them, and prints one line per test binary and run, then the failure count.
# A test that fails 1 time in 20 is a bug: run this before trusting a change to those paths.
#   scripts/soak.sh [N=8]      (after scripts/test.sh has set up .venv and target/fixtures)
# Do not edit coordinator/src while it runs: the tests train on it.
set -uo pipefail
cd "$(dirname "$0")/.."
export ZEROTUNE_PYTHON="$PWD/.venv/bin/python" ZEROTUNE_FIXTURES="$PWD/target/fixtures"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore
runs=${1:-8}
cargo build -q --workspace --tests --bins || exit 1
sh -c 'while :; do :; done' &
hog=$!
trap 'kill "$hog" 2>/dev/null' EXIT
failed=0
for run in $(seq 1 "$runs"); do
    for target in "--test launch" "--test slurm" "--test zero" "--test serve" "--test serve_family" "--test serve_fim" "--test failures"; do
        # shellcheck disable=SC2086
        out=$(cargo test -q -p zerotune-tests $target 2>&1) || failed=$((failed + 1))
        echo "run $run ${target#--test }: $(echo "$out" | grep 'test result' | tail -1)"
        echo "$out" | grep -E '^test .* FAILED|panicked at' | head -5
    done
    out=$(cargo test -q -p zerotune-coordinator --lib 2>&1) || failed=$((failed + 1))
    echo "run $run coordinator lib: $(echo "$out" | grep 'test result' | tail -1)"
    echo "$out" | grep -E '^test .* FAILED|panicked at|^---- ' -A4 | head -12
done
echo "$failed failing test binary run(s) in $runs run(s)"
[ "$failed" -eq 0 ]
