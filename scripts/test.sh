#!/usr/bin/env bash
# Set up (if needed) and run the test suite plus the small benchmark suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q tests "$@"
