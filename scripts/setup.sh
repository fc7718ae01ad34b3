#!/usr/bin/env bash
# Sets up a fresh clone: libtorch for tch (.libtorch/), and with --test the Python oracle used by
# the tests (.venv/: PyTorch + HF transformers, and the real clients: the openai SDK, rapidfuzz),
# then builds the workspace.
#   scripts/setup.sh [--test] [--libtorch DIR] [--no-build]
#   LIBTORCH=DIR scripts/setup.sh ...        use a libtorch you already have (for instance a CUDA 12.x
#                                            build of torch 2.11 for an older driver or a P40): a libtorch
#                                            zip (DIR has build-version) or a pip torch (DIR = .../site-packages/torch
#                                            or the --target dir holding torch/); its version is checked
#   scripts/setup.sh --check-libtorch DIR    only say what DIR is and whether it fits (exit 1 if not)
# Needs: cargo (Rust toolchain), python3 with pip and venv. Everything else comes from PyPI/crates.io.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0 # tch 0.24 pins libtorch 2.11 (docs/toolchain.md)
want_test_env=0 build=1 check_only=0
libtorch=${LIBTORCH:-}
while (( $# )); do
    case "$1" in
        --test) want_test_env=1 ;;
        --no-build) build=0 ;;
        --libtorch) libtorch=${2:?--libtorch needs a directory}; shift ;;
        --libtorch=*) libtorch=${1#--libtorch=} ;;
        --check-libtorch) check_only=1; libtorch=${2:?--check-libtorch needs a directory}; shift ;;
        *) echo "setup: unknown argument $1 (expected --test, --libtorch DIR, --no-build or --check-libtorch DIR)" >&2; exit 2 ;;
    esac
    shift
done

# The libtorch directory (the one holding lib/libtorch_cpu.so) of DIR, and its version, or a
# message saying why DIR is not one.
libtorch_dir() {
    local dir=$1
    if [[ -f "$dir/lib/libtorch_cpu.so" ]]; then echo "$dir"
    elif [[ -f "$dir/torch/lib/libtorch_cpu.so" ]]; then echo "$dir/torch"
    elif [[ -f "$dir/libtorch/lib/libtorch_cpu.so" ]]; then echo "$dir/libtorch"
    else return 1; fi
}
libtorch_version() { # a pip torch has version.py, a libtorch zip build-version
    local dir=$1
    if [[ -f "$dir/version.py" ]]; then sed -n "s/^__version__ = '\(.*\)'.*/\1/p" "$dir/version.py"
    elif [[ -f "$dir/build-version" ]]; then head -1 "$dir/build-version"
    fi
}
# Checks DIR; prints what it found; sets $checked_dir. Exits with a message when it does not fit.
check_libtorch() {
    local given=$1 dir version cuda
    dir=$(libtorch_dir "$given") || {
        echo "setup: $given is not a libtorch: no lib/libtorch_cpu.so in it, nor in its torch/ or libtorch/ (give the directory that holds lib/)" >&2
        exit 1
    }
    dir=$(cd "$dir" && pwd)
    version=$(libtorch_version "$dir")
    if [[ -z "$version" ]]; then
        echo "setup: cannot tell the version of the libtorch at $dir (no version.py or build-version); zerotune needs ${TORCH_VERSION}" >&2
        exit 1
    fi
    case "$version" in
        *+cu*) cuda="CUDA $(echo "${version#*+cu}" | sed 's/^\([0-9]*\)\([0-9]\)$/\1.\2/')" ;;
        *+cpu) cuda="CPU only" ;;
        *) cuda="CUDA as built" ;;
    esac
    if [[ "${version%%+*}" != "$TORCH_VERSION" ]]; then
        echo "setup: $dir is libtorch ${version} (${cuda}), but zerotune needs ${TORCH_VERSION} (tch 0.24 is built against it): install torch==${TORCH_VERSION} (any CUDA build, e.g. the cu126 wheel for CUDA 12.x drivers) and point LIBTORCH at it, or drop LIBTORCH to install it into .libtorch/" >&2
        exit 1
    fi
    echo "setup: found libtorch ${version} (${cuda}) at $dir"
    checked_dir=$dir
}

if (( check_only )); then
    check_libtorch "$libtorch"
    exit 0
fi

need() { command -v "$1" >/dev/null 2>&1 || { echo "setup: '$1' is required but not installed ($2)" >&2; exit 1; }; }
need cargo "install the Rust toolchain, e.g. from your distribution or rustup"
need python3 "install Python 3.10+ with pip and venv"
no_room() { echo "setup: $1 failed; if pip said 'No space left on device': a clean clone's setup, tests and build took 10 GB under $PWD and ${TMPDIR:-/tmp}" >&2; exit 1; }

if [[ -n "$libtorch" ]]; then
    # The build reads .libtorch/torch (.cargo/config.toml): make it the given libtorch.
    check_libtorch "$libtorch"
    here=$(mkdir -p .libtorch && cd .libtorch && pwd)/torch
    if [[ "$checked_dir" == "$here" ]] || [[ -L "$here" && "$(readlink -f "$here")" == "$(readlink -f "$checked_dir")" ]]; then
        echo "setup: using it (it is .libtorch/torch)"
    elif [[ -e "$here" && ! -L "$here" ]]; then
        echo "setup: .libtorch/torch holds the libtorch a previous setup installed; remove .libtorch/ to use $checked_dir instead" >&2
        exit 1
    else
        ln -sfn "$checked_dir" "$here"
        echo "setup: using it: .libtorch/torch -> $checked_dir"
    fi
elif [[ ! -f .libtorch/torch/lib/libtorch_cpu.so ]]; then
    # libtorch 2.11 (CPU runtime; CUDA is loaded at run time when a GPU is asked for), as tch 0.24 needs.
    echo "setup: installing libtorch ${TORCH_VERSION} into .libtorch/ (about 1.2 GB; LIBTORCH=DIR uses one you have)"
    python3 -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps --target .libtorch \
        "torch==${TORCH_VERSION}" nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85 || no_room "installing libtorch"
else
    check_libtorch .libtorch/torch
fi

if (( want_test_env )); then
    # The Slurm tests start a one-node cluster of their own (scripts/slurm_cluster.sh): Debian's
    # Slurm and munge. Without them those tests fail, saying so; the rest of the setup goes on.
    slurm_packages=(slurmd slurmctld slurm-client munge)
    have_slurm() {
        local tool
        for tool in slurmd slurmctld srun munged; do
            PATH=$PATH:/usr/sbin:/sbin command -v "$tool" >/dev/null 2>&1 || return 1
        done
    }
    slurm_log=${TMPDIR:-/tmp}/zerotune-slurm-apt.log
    if have_slurm; then
        :
    elif (( EUID != 0 )); then
        echo "setup: not root, so not installing ${slurm_packages[*]}: the Slurm tests will fail until they are (apt-get install -y ${slurm_packages[*]})" >&2
    elif ! command -v apt-get >/dev/null 2>&1; then
        echo "setup: no apt-get, so not installing ${slurm_packages[*]}: the Slurm tests will fail until they are installed" >&2
    else
        echo "setup: installing ${slurm_packages[*]} (the Slurm tests' cluster)"
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${slurm_packages[@]}"; } >"$slurm_log" 2>&1; then
            echo "setup: apt-get could not install ${slurm_packages[*]} (see $slurm_log: $(tail -1 "$slurm_log")): the Slurm tests will fail until they are installed" >&2
        fi
    fi
    if [[ ! -x .venv/bin/python ]] || ! .venv/bin/python -c "import torch, transformers, openai, rapidfuzz" 2>/dev/null; then
        echo "setup: creating .venv with PyTorch + transformers (the tests' reference), the openai SDK and rapidfuzz"
        python3 -m venv .venv
        if [[ -f .libtorch/torch-${TORCH_VERSION}.dist-info/METADATA ]]; then
            # The venv imports the torch this script installed in .libtorch (a .pth file puts it on
            # sys.path) rather than a second 1.2 GB copy, and gets only the libraries that torch loads
            # at import: its requirements minus triton, which only torch.compile uses.
            site_packages=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_path('purelib'))")
            echo "$PWD/.libtorch" >"$site_packages/zerotune-libtorch.pth"
            mapfile -t torch_requirements < <(sed -n 's/^Requires-Dist: //p' .libtorch/torch-${TORCH_VERSION}.dist-info/METADATA |
                grep -v -e '^triton' -e 'extra ==')
        else
            # .libtorch/torch is the user's own libtorch (LIBTORCH=DIR), perhaps a zip with no Python
            # package and its CUDA libraries elsewhere: the venv gets a torch of its own.
            torch_requirements=("torch==${TORCH_VERSION}")
        fi
        # No pip cache: CI disks are small.
        .venv/bin/pip install --quiet --disable-pip-version-check --no-cache-dir \
            "${torch_requirements[@]}" "transformers==5.24.0" safetensors tokenizers numpy "openai==3.57.0" "rapidfuzz==3.14.6" \
            2> >(grep -v -e "dependency resolver does not" -e "requires triton" >&2) || no_room "creating .venv"
    fi
fi

if (( build )); then
    echo "setup: building the workspace"
    cargo build --workspace --bins --quiet
fi
