#!/usr/bin/env bash
# Installs torch into the given virtual environment without ever pulling a CUDA build onto a
# machine that has no NVIDIA GPU: CUDA machines get PyPI's default build; CPU-only machines get
# torch 2.13.0's CPU build, from a local wheel directory when pip has one, else from PyTorch's
# CPU index.
set -euo pipefail
pip="$1"
if "$pip" show torch >/dev/null 2>&1; then
    exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$pip" install -q 'torch>=2.4'
elif "$pip" install -q --no-index torch==2.13.0 2>/dev/null; then
    :
else
    "$pip" install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
fi
