"""Where the tests' files are, and the environment of a child process (torchrun, a killed run)
that imports bombkd from this checkout and the test helpers beside this file."""
from __future__ import annotations

import os
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
GOLDEN = TESTS / "assets" / "golden"   # the golden shard set of FORMAT.md


# Python source a child process runs first: every import of DALI, PyAV, transformers, Pillow
# and matplotlib then fails as for a package that is not installed; BLOCKED names them.
NO_EXTRAS = r'''
import importlib.abc, sys

BLOCKED = {"nvidia", "av", "transformers", "PIL", "matplotlib"}

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NotInstalled())
'''


def child_env() -> dict[str, str]:
    """This environment, with bombkd and the test helpers importable and one OpenMP thread."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]),
            "OMP_NUM_THREADS": "1"}
