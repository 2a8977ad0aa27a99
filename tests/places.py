"""Where the tests' files are, and the environment of a child process (torchrun, a killed run)
that imports bombkd from this checkout and the test helpers beside this file."""
from __future__ import annotations

import os
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
GOLDEN = TESTS / "assets" / "golden"   # the golden shard set of FORMAT.md


def child_env() -> dict[str, str]:
    """This environment, with bombkd and the test helpers importable and one OpenMP thread."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]),
            "OMP_NUM_THREADS": "1"}
