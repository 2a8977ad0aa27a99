#!/usr/bin/env bash
# Set up bombkd in ./.venv (idempotent) with everything the demo and the tests use: cached mode,
# the video extras (PyAV, transformers, DALI for CUDA 12), the plot extra and the test tools.
# Where there is no NVIDIA GPU, torch comes from PyTorch's CPU index first, so a CPU machine
# never downloads the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        pip install torch
    else
        # PyTorch's CPU index first (one retry per page: an unreachable index costs seconds,
        # and pip goes on with the other configured sources); failing that, the pinned release
        # from the configured indexes.
        pip install --retries 1 torch --index-url https://download.pytorch.org/whl/cpu \
            || pip install torch==2.13.0
    fi
fi
pip install -e ".[dali-cu12,plot,test]"
