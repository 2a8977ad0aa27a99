#!/usr/bin/env bash
# The prepared check for a machine with a GPU: one line per check, under 5 minutes, no network
# (scripts/gpu_check.py says what each check does). Runs the torch side where DALI is not
# installed and says what it skipped. PYTHON picks the interpreter (default: .venv's, else
# python3). Exit status 1 if a check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
echo "INFO machine: $(hostname), $(nproc) CPUs; $("$PYTHON" --version 2>&1)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
    --format=csv,noheader | sed 's/^/INFO nvidia-smi: /'
HF_HUB_OFFLINE=1 PYTHONPATH="$PWD" timeout 290 "$PYTHON" scripts/gpu_check.py
status=$?
[ "$status" = 124 ] && echo "FAIL gpu-check: stopped after 290 s"
exit "$status"
