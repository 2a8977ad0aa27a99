#!/usr/bin/env bash
# Set up (if needed), run the test suite, then the small benchmark suite (speedup and parity,
# measured side by side; a few minutes on 2 CPU cores). Extra arguments go to the test run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q tests "$@"
.venv/bin/python -m pytest -q benchmarks --benchmark --benchmark-size small -p no:cacheprovider
