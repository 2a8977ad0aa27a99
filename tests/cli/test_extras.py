"""Cached mode runs with nothing but the core dependencies; video mode without its extra fails
with one line naming the extra to install.

The child process refuses every import of DALI, PyAV, transformers, Pillow and matplotlib
(``places.NO_EXTRAS``: as for a package that is not installed), then runs the cached-mode commands, then video-mode ones.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bombkd_io.errors import MissingExtraError, needs_extra
from places import NO_EXTRAS, child_env

CHILD = NO_EXTRAS + r'''
import json, tempfile
from pathlib import Path

from typer.testing import CliRunner
from bombkd_train.cli.main import app
from synthetic_cache import make_feature_cache

tmp = Path(tempfile.mkdtemp())
root = make_feature_cache(tmp / "cache")
make_feature_cache(root, split="test", count=20, seed=1)
conv, fusion = root / "conv" / "converters.pt", tmp / "run" / "fusion_ep1.pt"
commands = {
    "inspect": ["inspect", str(root), "--split", "train", "--verify"],
    "train-converters": ["train-converters", "--root", str(root), "--split", "train",
                         "--teachers", "ta,tb", "--epochs", "1", "--batch", "16",
                         "--save-dir", str(conv.parent)],
    "train": ["train", "--loader", "wds", "--root", str(root), "--split", "train",
              "--teachers", "ta,tb", "--converters", str(conv), "--classes", "4", "--batch", "8",
              "--epochs", "1", "--save-dir", str(fusion.parent), "--device", "cpu", "--quiet"],
    "eval": ["eval", "--loader", "wds", "--root", str(root), "--split", "test",
             "--fusion", str(fusion), "--out", str(tmp / "eval"), "--device", "cpu"],
    "sample-data": ["sample-data", str(tmp / "videos")],
    "probe": ["probe", str(tmp / "v.webm")],
    "train-dali": ["train", "--loader", "dali", "--dataset", "folder", "--root", str(tmp),
                   "--split", "all", "--student", "tiny-vjepa2", "--teachers", "ta",
                   "--converters", str(conv), "--classes", "4", "--save-dir", str(tmp / "v")],
}
results = {}
for name, args in commands.items():
    result = CliRunner().invoke(app, args)
    results[name] = {"code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr,
                     "exception": repr(result.exception)}
results["png"] = (tmp / "eval" / "confusion.png").exists()
results["imported"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps(results))
'''


@pytest.fixture(scope="module")
def child():
    out = subprocess.run([sys.executable, "-c", CHILD], env=child_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.slow    # the child process: ~10 s on 2 cores
@pytest.mark.parametrize("command", ["inspect", "train-converters", "train", "eval"])
def test_cached_mode_needs_no_extra(child, command):
    assert child[command]["code"] == 0, child[command]
    assert child["imported"] == []


@pytest.mark.slow
def test_eval_without_matplotlib_writes_json_and_says_why_no_png(child):
    assert not child["png"]
    assert "eval.json; confusion.png needs matplotlib: pip install 'bombkd[plot]'" \
        in child["eval"]["stdout"]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["sample-data", "probe", "train-dali"])
def test_video_mode_without_its_extra_is_one_line(child, command):
    result = child[command]
    assert result["code"] == 2, result
    assert result["stderr"] == ("error: video mode needs PyAV and transformers (no module 'av'): "
                                "pip install 'bombkd[video]'\n")


def test_a_broken_install_keeps_its_own_error():
    with pytest.raises(ModuleNotFoundError) as caught, needs_extra("video"):
        import bombkd_no_such_module  # noqa: F401
    assert not isinstance(caught.value, MissingExtraError)


def test_missing_extra_is_an_import_error_naming_the_extra():
    error = MissingExtraError("dali", "nvidia")
    assert isinstance(error, ImportError) and error.name == "nvidia"
    assert str(error) == ("video mode needs NVIDIA DALI (no module 'nvidia'): pip install "
                          "'bombkd[dali-cu12]' (CUDA 12) or 'bombkd[dali-cu13]' (CUDA 13)")
