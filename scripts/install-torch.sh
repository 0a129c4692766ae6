#!/usr/bin/env bash
# Installs torch into the given virtual environment without ever pulling a CUDA build onto a
# machine that has no NVIDIA GPU: CUDA machines get PyPI's default build; CPU-only machines get
# torch 2.13.0's CPU build, from a wheel pip can find locally (its find-links) when there is one,
# else from PyTorch's CPU index. Torch's own dependencies come from PyPI either way.
set -euo pipefail
pip="$1"
if "$pip" show torch >/dev/null 2>&1; then
    exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$pip" install -q 'torch>=2.4'
    exit 0
fi
local_dir=$(mktemp -d)
trap 'rm -rf "$local_dir"' EXIT
if "$pip" download -q --no-deps --no-index -d "$local_dir" torch==2.13.0 2>/dev/null \
        && ls "$local_dir"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
    "$pip" install -q "$local_dir"/torch-2.13.0+cpu-*.whl
else
    "$pip" install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
        --extra-index-url https://pypi.org/simple
fi
