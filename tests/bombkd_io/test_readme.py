"""The README's Python blocks run as written, on a small cache the test makes.

Every fenced ```python block of README.md runs in its own process, in a folder holding a
synthetic fp16 cache at ``./features/ucf101`` (the path the README's examples use, so no block
is rewritten) and the video ``v_Jump_g01_c01.webm``. An HTML comment on the line before a block,
invisible on the rendered page, says how to run it:

- ``<!-- snippet: torchrun N -->``: under ``python -m torch.distributed.run --nproc_per_node N``
  (2 CPU processes, gloo);
- ``<!-- snippet: needs MODULE ... -->``: only where every MODULE imports, else skipped with the
  reason. The Lightning block is one: Lightning is not a dependency of bombkd, so where it is not
  installed that block is reported as skipped, and it runs (on the CPU) where it is.

Bash blocks are not run: they are the CLI, which the CLI tests run, on data paths of the reader's.
"""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from places import REPO, child_env
from synthetic_cache import make_feature_cache

BLOCK_RE = re.compile(r"(?:<!-- snippet: (?P<how>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)


def readme_blocks(text: str) -> list[tuple[str, str, str]]:
    """(id, how, code) of each ```python block: id is its line in the README."""
    return [(f"README.md:{text.count(chr(10), 0, m.start('code'))}", m["how"] or "", m["code"])
            for m in BLOCK_RE.finditer(text)]


BLOCKS = readme_blocks((REPO / "README.md").read_text())


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A working folder: ./features/ucf101 (64 samples, 8 shards: 2 ranks x 2 workers read
    two each) and, where PyAV is installed, ./v_Jump_g01_c01.webm."""
    here = tmp_path_factory.mktemp("readme")
    make_feature_cache(here / "features" / "ucf101", dataset="ucf101", count=64, shard_size=8,
                       dtype="float16")
    if importlib.util.find_spec("av"):
        from bombkd_io.sample_data import make_codec_clips
        make_codec_clips(here, ["vp9"])["vp9"].rename(here / "v_Jump_g01_c01.webm")
    return here


def _command(how: str, script: Path) -> list[str]:
    """How to run the block ``how`` marks (skip it where a module it needs is missing)."""
    words = how.split()
    if words and words[0] not in ("torchrun", "needs"):
        raise ValueError(f"unknown snippet marker {how!r}: expected 'torchrun N' or 'needs MODULE ...'")
    if words[:1] == ["torchrun"]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", words[1], str(script)]
    missing = [m for m in words[1:] if importlib.util.find_spec(m.split(".")[0]) is None
               or importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"this block needs {', '.join(missing)}, not installed here")
    return [sys.executable, str(script)]


def test_the_readme_has_the_loop_blocks():
    hows = [how.split()[0] if how else "" for _, how, _ in BLOCKS]
    codes = "".join(code for _, _, code in BLOCKS)
    assert hows.count("torchrun") == 1 and "import lightning" in codes
    assert codes.count("loader.set_epoch(") >= 2


@pytest.mark.slow   # a process per block (the torchrun one: 3), ~5-20 s each on 2 cores
@pytest.mark.parametrize("how, code", [b[1:] for b in BLOCKS], ids=[b[0] for b in BLOCKS])
def test_readme_block_runs(folder, tmp_path, how, code):
    script = tmp_path / "snippet.py"
    script.write_text(code)
    out = subprocess.run(_command(how, script), cwd=folder, env=child_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, f"{how or 'python'}:\n{code}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    if "set_epoch" in code and "lightning" not in code:
        assert "epoch 2:" in out.stdout, out.stdout   # every epoch ran, the last one printed


def test_an_unknown_marker_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown snippet marker 'torchrn 2'"):
        _command("torchrn 2", tmp_path / "x.py")
    [(_, how, code)] = readme_blocks("x\n<!-- snippet: needs lightning -->\n```python\nprint(1)\n```\n")
    assert (how, code) == ("needs lightning", "print(1)\n")
