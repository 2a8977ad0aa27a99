#!/usr/bin/env bash
# Set up bombkd in ./.venv (idempotent). Installs the CPU build of torch where there is no NVIDIA
# GPU, so a CPU machine never downloads the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        pip install torch
    else
        pip install torch==2.13.0 || pip install torch --index-url https://download.pytorch.org/whl/cpu
    fi
fi
pip install -e ".[test]"
