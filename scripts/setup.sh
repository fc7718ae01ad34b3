#!/usr/bin/env bash
# Sets up a fresh clone: libtorch for tch (.libtorch/), and with --test the Python oracle used by
# the tests (.venv/: PyTorch + HF transformers, and the real clients: the openai SDK, rapidfuzz),
# then builds the workspace.
# Needs: cargo (Rust toolchain), python3 with pip and venv. Everything else comes from PyPI/crates.io.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0
want_test_env=0
[[ "${1:-}" == "--test" ]] && want_test_env=1

need() { command -v "$1" >/dev/null 2>&1 || { echo "setup: '$1' is required but not installed ($2)" >&2; exit 1; }; }
need cargo "install the Rust toolchain, e.g. from your distribution or rustup"
need python3 "install Python 3.10+ with pip and venv"
no_room() { echo "setup: $1 failed; if pip said 'No space left on device': a clean clone's setup, tests and build took 8 GB under $PWD and ${TMPDIR:-/tmp}" >&2; exit 1; }

# libtorch 2.11 (CPU runtime; CUDA is loaded at run time when a GPU is asked for), as tch 0.24 needs.
if [[ ! -f .libtorch/torch/lib/libtorch_cpu.so ]]; then
    echo "setup: installing libtorch ${TORCH_VERSION} into .libtorch/ (about 1.2 GB)"
    python3 -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps --target .libtorch \
        "torch==${TORCH_VERSION}" nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85 || no_room "installing libtorch"
fi

if (( want_test_env )); then
    if [[ ! -x .venv/bin/python ]] || ! .venv/bin/python -c "import torch, transformers, openai, rapidfuzz" 2>/dev/null; then
        echo "setup: creating .venv with PyTorch + transformers (the tests' reference), the openai SDK and rapidfuzz"
        python3 -m venv .venv
        # The venv imports the torch already in .libtorch (a .pth file puts it on sys.path) rather than a
        # second 1.2 GB copy, and gets only the libraries that torch loads at import: its requirements
        # minus triton, which only torch.compile uses. No pip cache: CI disks are small.
        site_packages=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_path('purelib'))")
        echo "$PWD/.libtorch" >"$site_packages/zerotune-libtorch.pth"
        mapfile -t torch_requirements < <(sed -n 's/^Requires-Dist: //p' .libtorch/torch-${TORCH_VERSION}.dist-info/METADATA |
            grep -v -e '^triton' -e 'extra ==')
        .venv/bin/pip install --quiet --disable-pip-version-check --no-cache-dir \
            "${torch_requirements[@]}" "transformers==5.24.0" safetensors tokenizers numpy "openai==3.57.0" "rapidfuzz==3.14.6" \
            2> >(grep -v -e "dependency resolver does not" -e "requires triton" >&2) || no_room "creating .venv"
    fi
fi

echo "setup: building the workspace"
cargo build --workspace --bins --quiet
