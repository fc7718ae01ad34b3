#!/usr/bin/env bash
# Sets up a fresh clone: libtorch for tch (.libtorch/), and with --test the Python oracle used by
# the tests (.venv/: PyTorch + HF transformers), then builds the workspace.
# Needs: cargo (Rust toolchain), python3 with pip and venv. Everything else comes from PyPI/crates.io.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0
want_test_env=0
[[ "${1:-}" == "--test" ]] && want_test_env=1

need() { command -v "$1" >/dev/null 2>&1 || { echo "setup: '$1' is required but not installed ($2)" >&2; exit 1; }; }
need cargo "install the Rust toolchain, e.g. from your distribution or rustup"
need python3 "install Python 3.10+ with pip and venv"

# libtorch 2.11 (CPU runtime; CUDA is loaded at run time when a GPU is asked for), as tch 0.24 needs.
if [[ ! -f .libtorch/torch/lib/libtorch_cpu.so ]]; then
    echo "setup: installing libtorch ${TORCH_VERSION} into .libtorch/ (about 1.2 GB)"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --target .libtorch \
        "torch==${TORCH_VERSION}" nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85
fi

if (( want_test_env )); then
    if [[ ! -x .venv/bin/python ]] || ! .venv/bin/python -c "import torch, transformers" 2>/dev/null; then
        echo "setup: creating .venv with PyTorch + transformers (the tests' reference implementation)"
        python3 -m venv .venv
        .venv/bin/pip install --quiet --disable-pip-version-check \
            "torch==${TORCH_VERSION}" "transformers==5.24.0" safetensors tokenizers numpy
    fi
fi

echo "setup: building the workspace"
cargo build --workspace --bins --quiet
