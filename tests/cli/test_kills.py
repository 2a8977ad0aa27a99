"""Kills leave nothing behind: loader workers die with a killed `train`, the next run clears a
killed run's temporary files, a second run into a busy folder is refused, and an interrupted
featurize says how to finish (and so do `inspect` and `train` on its cache)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bombkd_io.errors import FolderBusyError
from bombkd_io.lock import lock_folder
from bombkd_train.cli.main import app
from bombkd_train.config import ConverterTrainConfig, FeaturizeConfig
from bombkd_train.converters import train_converters
from bombkd_train.featurize import featurize
from places import child_env
from synthetic_cache import TEACHERS, make_feature_cache

CLI = "from bombkd_train.cli.main import app; app()"
runner = CliRunner()
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux /proc")


def _env() -> dict:
    return child_env()


def _spawn(args: list, log: Path) -> subprocess.Popen:
    """`bombkd ARGS` in a new process; stdout and stderr to ``log`` (a pipe could fill up)."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-c", CLI, *map(str, args)], env=_env(),
                                stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A small synthetic cache with converters fitted on it (``conv/converters.pt``)."""
    root = make_feature_cache(tmp_path_factory.mktemp("cache"))
    train_converters(ConverterTrainConfig(root=str(root), split="train", teachers=list(TEACHERS),
                                          save_dir=str(root / "conv"), epochs=0, batch_size=16,
                                          progress=False))
    return root


def _train_args(cache: Path, save_dir: Path, *extra, converters: Path | None = None) -> list[str]:
    converters = converters or cache / "conv" / "converters.pt"
    return ["train", "--loader", "wds", "--root", str(cache), "--split", "train", "--teachers",
            ",".join(TEACHERS), "--converters", str(converters),
            "--classes", "4", "--batch", "8", "--save-dir", str(save_dir), "--device", "cpu",
            "--quiet", *extra]


def _fails(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


# --- workers ---------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] not in "ZX":
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie no one reaps counts as dead: it holds no memory and runs nothing)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in "ZX"


@linux
@pytest.mark.slow
def test_killed_train_takes_its_loader_workers_along(cache, tmp_path):
    # Batches big enough (8 x 64 x [4, 16] float32 per transfer, over a pipe's 64 KiB) that a
    # worker whose parent stops reading blocks for good in its queue's feeder thread, as in the
    # issue; epochs long enough (256 steps) that the workers seen are mid-epoch when it is killed
    big = make_feature_cache(tmp_path / "big", count=16384, shard_size=2048, teachers={})
    proc = _spawn(_train_args(big, tmp_path / "run", "--batch", "64", "--epochs", "100",
                              "--workers", "2", converters=cache / "conv" / "converters.pt"),
                  tmp_path / "train.log")
    workers = []
    try:
        deadline = time.monotonic() + 120
        while len(_children(proc.pid)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the workers fill their queue while the loop takes batches
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert len(workers) == 2, (tmp_path / "train.log").read_text()[-2000:]
        # torch's own watchdog ends an idle worker after up to 5 s; these must go at once
        deadline = time.monotonic() + 3
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [w for w in workers if _alive(w)], "workers outlived the killed train"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in filter(_alive, workers):  # a failed run leaves no orphans either
            os.kill(pid, signal.SIGKILL)


# --- leftovers -------------------------------------------------------------------------------


def test_next_train_run_clears_a_killed_runs_temporary_files(cache, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # killed while writing its first checkpoint and its metrics file (no --resume: nothing to
    # resume from), and files that are not the run's temporary files
    killed = [".fusion_ep1.tmp-999-0.pt", ".metrics.tmp-999-3.jsonl"]
    unrelated = ["notes.txt", ".notes.tmp-999-0.txt", ".fusion_ep1.pt", "fusion_ep1.pt.tmp",
                 ".fusion_ep1.tmp-abc-0.pt", ".converters.tmp-999-0.pt"]
    for name in killed + unrelated:
        (run / name).write_bytes(b"half")
    result = runner.invoke(app, _train_args(cache, run, "--epochs", "1"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["fusion_ep1.pt", "metrics.jsonl", *unrelated])
    # killed while writing the second checkpoint, then resumed
    (run / ".fusion_ep2.tmp-998-5.pt").write_bytes(b"half")
    result = runner.invoke(app, _train_args(cache, run, "--epochs", "2", "--resume"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["fusion_ep1.pt", "fusion_ep2.pt", "metrics.jsonl", *unrelated])
    assert all((run / name).read_bytes() == b"half" for name in unrelated)


# --- one run per folder ----------------------------------------------------------------------

HOLD = ("import sys, time\nfrom bombkd_io.lock import lock_folder\n"
        "lock = lock_folder(sys.argv[1], argument='--save-dir')\n"
        "print('locked', flush=True)\ntime.sleep(120)\n")


def test_second_train_into_a_busy_save_dir_is_refused(cache, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], env=_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = runner.invoke(app, _train_args(cache, run, "--epochs", "1"))
        _fails(result, f"--save-dir {run}: another bombkd run (PID {holder.pid})",
               "wait for it to finish, or pass another --save-dir")
        assert [p.name for p in run.iterdir()] == [".bombkd.lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    # the killed holder's lock file is still there; the kernel dropped its lock with it
    assert (run / ".bombkd.lock").exists()
    result = runner.invoke(app, _train_args(cache, run, "--epochs", "1"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in run.iterdir()) == ["fusion_ep1.pt", "metrics.jsonl"]


def test_the_lock_is_per_folder_and_leaves_nothing(tmp_path):
    out = tmp_path / "new" / "cache"
    with lock_folder(out, argument="--out", name="ucf101-train"):
        with pytest.raises(FolderBusyError, match=f"PID {os.getpid()}"):
            lock_folder(out, argument="--out", name="ucf101-train")
        with lock_folder(out, argument="--out", name="ucf101-test"):  # another split: free
            assert sorted(p.name for p in out.iterdir()) == [".ucf101-test.lock",
                                                             ".ucf101-train.lock"]
    assert not (tmp_path / "new").exists()  # the folders it made, empty again, are gone


def test_second_featurize_into_a_busy_out_is_refused(sample_root, tmp_path):
    out = tmp_path / "cache"
    with lock_folder(out, argument="--out", name="ucf101-train"):
        result = runner.invoke(app, ["featurize", "--dataset", "ucf101", "--root",
                                     str(sample_root), "--split", "train", "--student",
                                     "tiny-vjepa2", "--out", str(out)])
        _fails(result, f"--out {out}: another bombkd run (PID {os.getpid()})",
               "pass another --out")
    assert not out.exists()


# --- interrupted featurize -------------------------------------------------------------------


def _featurize_config(root: Path, out: Path, **kw) -> FeaturizeConfig:
    return FeaturizeConfig(**{**dict(dataset="ucf101", root=str(root), split="train",
                                     student="tiny-vjepa2", out=str(out), shard_size=1,
                                     batch_size=1, decode_threads=1), **kw})


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_interrupted_featurize_says_how_to_finish_and_resumes_to_the_same_folder(
        sample_root, tmp_path):
    out = tmp_path / "cache"
    proc = _spawn(["featurize", "--dataset", "ucf101", "--root", sample_root, "--split", "train",
                   "--student", "tiny-vjepa2", "--out", out, "--shard-size", "1", "--batch", "1",
                   "--workers", "1"], tmp_path / "featurize.log")
    progress = out / "ucf101-train.progress.json"
    deadline = time.monotonic() + 120
    while not progress.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)  # Ctrl-C after the first shard
    assert proc.wait(timeout=60) == 130, (tmp_path / "featurize.log").read_text()[-2000:]
    assert "interrupted: re-run with --resume to finish" in (tmp_path / "featurize.log").read_text()
    assert progress.exists() and not (out / "ucf101-train.index.json").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") or ".tmp" in p.name]

    # what kill -9 during the progress file's, the manifest's and a shard's write leaves
    killed = [".ucf101-train.progress.tmp-999-0.json", ".ucf101-train.index.tmp-999-1.json",
              "ucf101-train-student-000011.tar.tmp"]
    unrelated = [".ucf101-test.index.tmp-999-0.json", "notes.txt"]
    for name in killed + unrelated:
        (out / name).write_bytes(b"half")

    finish = f"--out {out} --resume"
    _fails(runner.invoke(app, ["inspect", str(out)]),
           "featurize run into this folder is unfinished", "ucf101-train.progress.json", finish)
    _fails(runner.invoke(app, _train_args(out, tmp_path / "run")), "unfinished", finish)
    assert not (tmp_path / "run").exists()

    featurize(_featurize_config(sample_root, out, resume=True))
    featurize(_featurize_config(sample_root, tmp_path / "whole"))  # never interrupted
    resumed = _files(out)
    assert all(resumed.pop(name) == b"half" for name in unrelated)
    assert resumed == _files(tmp_path / "whole")  # the same bytes, the same file list


def test_stray_shards_without_a_manifest_are_an_unfinished_run(tmp_path):
    (tmp_path / "ucf101-train-student-000000.tar").write_bytes(b"x")
    _fails(runner.invoke(app, ["inspect", str(tmp_path), "--split", "train"]),
           "featurize run into this folder is unfinished", "ucf101-train-student-000000.tar",
           f"--split train --out {tmp_path} --resume")
