"""featurize over several processes: torchrun with W = 1, 2, 3 (gloo on the CPU) and a job
array (--rank/--world-size, then --finalize) write the one-process run's cache byte for byte,
with a video that fails to probe (conftest's ``small_root``) and one that probes but fails to
decode (which moves every later shard's start); a rank that never ran leaves a run that --resume
finishes with any W."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bombkd_io.datasets import index_dataset
from bombkd_train.cli.main import app
from places import child_env

STUDENT, TEACHER = "tiny-vjepa2", "tiny-vivit"  # two decode needs: 16x112 and 16x64
VICTIM = 1  # index position of a video that probes but fails to decode (injected)

# Every process: the victim's decode fails (injected), then `bombkd ARGS...`.
CHILD = '''
import sys
from bombkd_io.video import ClipLoader
from faults import failing_decode
ClipLoader.decode_batch = failing_decode(sys.argv[1])
from bombkd_train.cli.main import app
app(sys.argv[2:], prog_name="bombkd")
'''


@pytest.fixture(scope="module")
def child(tmp_path_factory) -> Path:
    script = tmp_path_factory.mktemp("child") / "featurize_child.py"
    script.write_text(CHILD)
    return script


def bombkd(child: Path, videos: Path, out: Path, *extra: str, world: int = 0):
    """``bombkd featurize`` into ``out`` (``world``: under torchrun with that many ranks)."""
    victim = index_dataset("ucf101", videos, "train").items[VICTIM].path
    args = ["featurize", "--dataset", "ucf101", "--root", str(videos), "--split", "train",
            "--student", STUDENT, "--teachers", TEACHER, "--out", str(out), "--shard-size", "2",
            "--batch", "2", "--workers", "1", "--device", "cpu", *extra]
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(world)] if world else [sys.executable])
    return subprocess.run([*launch, str(child), victim, *args], env=child_env(),
                          capture_output=True, text=True, timeout=300)


def files(out: Path) -> dict[str, str]:
    """Every file in ``out``: name -> sha256."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def reference(child, small_root, tmp_path_factory) -> dict[str, str]:
    """The one-process run's cache (no torchrun)."""
    out = tmp_path_factory.mktemp("one") / "cache"
    proc = bombkd(child, small_root, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = files(out)
    # 9 videos, 2 failed: shards of 2, 2, 2, 1 for each of the two models, and the manifest
    assert len(got) == 9 and "ucf101-train.index.json" in got, sorted(got)
    return got


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 3])
def test_torchrun_writes_the_one_process_cache(world, child, small_root, reference, tmp_path):
    out = tmp_path / "cache"
    proc = bombkd(child, small_root, out, world=world)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert files(out) == reference  # every file, manifest included; no progress record left
    if world > 1:
        lines = [line for line in proc.stdout.splitlines() if line.startswith("rank ")]
        assert [line.split(":")[0] for line in lines] == [f"rank {r}/{world}"
                                                          for r in range(world)]
        assert all("clips/s" in line and "failed" in line for line in lines)
        assert "featurized 7 clips (2 failed)" in proc.stdout


@pytest.mark.slow
def test_job_array_then_finalize(child, small_root, reference, tmp_path):
    out = tmp_path / "cache"
    for rank in range(3):  # the tasks one after another, as a busy scheduler runs them
        proc = bombkd(child, small_root, out, "--rank", str(rank), "--world-size", "3")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"rank {rank}/3: " in proc.stdout and "--finalize" in proc.stdout
    assert not (out / "ucf101-train.index.json").exists()
    assert sorted(p.name for p in out.glob("*.json")) == [  # each task its own record
        f"ucf101-train.rank{r}.progress.json" for r in range(3)]
    unfinished = CliRunner().invoke(app, ["inspect", str(out)])
    assert unfinished.exit_code == 2 and "--finalize" in unfinished.output, unfinished.output
    # the planned shards 1..3 started before the video the decoder refuses was known
    early = bombkd(child, small_root, out, "--finalize")
    message = early.stderr + early.stdout
    assert early.returncode == 2, message
    assert "ucf101-train-student-000001.tar" in message and "--resume" in message
    for rank in range(2):  # the redo, as an array of two
        proc = bombkd(child, small_root, out, "--resume", "--rank", str(rank), "--world-size", "2")
        assert proc.returncode == 0, proc.stderr[-3000:]
    # a shard past the plan's end that a killed task finished but never recorded
    (out / "ucf101-train-student-000004.tar").write_bytes(b"planned before the failure")
    done = bombkd(child, small_root, out, "--finalize")
    assert done.returncode == 0, done.stderr[-3000:]
    assert files(out) == reference


@pytest.mark.slow
@pytest.mark.parametrize("world", [0, 2])  # --resume as one process, or under torchrun
def test_a_rank_that_never_ran_is_named_and_resume_writes_only_its_shards(world, child,
                                                                          small_root, reference,
                                                                          tmp_path):
    out = tmp_path / "cache"
    for rank in (0, 2):
        assert bombkd(child, small_root, out, "--rank", str(rank), "--world-size", "3",
                      "--resume").returncode == 0
    missing = bombkd(child, small_root, out, "--finalize")
    message = missing.stderr + missing.stdout
    assert missing.returncode == 2 and "ucf101-train-tiny-vivit-000001.tar" in message
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    proc = bombkd(child, small_root, out, "--resume", world=world)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert files(out) == reference
    # rank 2 read rank 0's record (--resume): it knew of the failed decode, so only shard 1
    # (rank 1's) was missing
    rewritten = {name for name in files(out) if name not in before
                 or (out / name).stat().st_mtime_ns != before[name]}
    assert rewritten == {"ucf101-train-student-000001.tar", "ucf101-train-tiny-vivit-000001.tar",
                         "ucf101-train.index.json"}


def test_bad_combinations_are_refused_with_the_fix(small_root, tmp_path, monkeypatch):
    runner = CliRunner()
    args = ["featurize", "--dataset", "ucf101", "--root", str(small_root), "--split", "train",
            "--student", STUDENT, "--out", str(tmp_path / "c")]
    for extra, words in ((["--rank", "1"], "--rank and --world-size go together"),
                         (["--world-size", "2"], "--rank and --world-size go together"),
                         (["--rank", "3", "--world-size", "3"],
                          "--rank 3: must be in 0 .. --world-size - 1 (2)"),
                         (["--rank", "-1", "--world-size", "2"], "--rank -1: must be in"),
                         (["--finalize", "--rank", "0", "--world-size", "2"],
                          "pass it without --rank/--world-size"),
                         (["--finalize"], "no featurize run to finalize there")):
        got = runner.invoke(app, [*args, *extra])
        assert got.exit_code == 2 and words in got.output, (extra, got.output)
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
    got = runner.invoke(app, [*args, "--rank", "0", "--world-size", "2"])
    assert got.exit_code == 2 and "come from torchrun" in got.output, got.output
