#!/usr/bin/env bash
# Set up (if needed) and run the demo: the whole path on the built-in sample data, both modes.
# Each run gets a fresh folder under demo_out/ (or the folder given as $1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-demo_out/$(date +%Y%m%d-%H%M%S)}
.venv/bin/bombkd demo "$out"
