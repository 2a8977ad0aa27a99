#!/usr/bin/env bash
# Set up (if needed) and run the demo: the whole path on the built-in sample data, both modes.
# Each run gets a fresh folder under demo_out/ (or the folder given as $1). Quiet: no progress
# bars (set BOMBKD_DEMO_PROGRESS=1 to see them); the last line is the path of report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-demo_out/$(date +%Y%m%d-%H%M%S)}
quiet=--quiet
[[ -n "${BOMBKD_DEMO_PROGRESS:-}" ]] && quiet=
.venv/bin/bombkd demo "$out" $quiet
