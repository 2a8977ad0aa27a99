"""A real `python -m bombkd train` killed with -9 at a random step, or stopped by SIGTERM, SIGINT
or SIGUSR1 (alone, or under torchrun to one rank of two), resumes with --resume to the weights,
optimizer state and step records of an uninterrupted run."""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bombkd_train.cli.train import EXIT_PREEMPTED
from bombkd_train.config import ConverterTrainConfig
from bombkd_train.converters import train_converters
from places import child_env
from same_run import assert_same_run, records
from synthetic_cache import TEACHERS, make_feature_cache

STOPPED = re.compile(r"stopped by (\S+(?: [a-z ]+)?) after step (\d+): wrote (\S+); resume with "
                     r"the same command with --resume")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """960 samples in 15 shards (120 steps of 8 an epoch) and converters fitted on them."""
    root = make_feature_cache(tmp_path_factory.mktemp("cache"), count=960, shard_size=64,
                              dtype="float16")
    train_converters(ConverterTrainConfig(root=str(root), split="train", teachers=list(TEACHERS),
                                          save_dir=str(root / "conv"), epochs=0, batch_size=16,
                                          progress=False))
    return root


def _args(cache: Path, run: Path, *extra) -> list[str]:
    return ["train", "--loader", "wds", "--root", str(cache), "--split", "train", "--teachers",
            ",".join(TEACHERS), "--converters", str(cache / "conv" / "converters.pt"),
            "--classes", "4", "--batch", "8", "--epochs", "2", "--save-dir", str(run),
            "--device", "cpu", "--quiet", "--save-every", "3", *extra]


def _spawn(args: list[str], log: Path, torchrun: bool = False) -> subprocess.Popen:
    """`python -m bombkd ARGS` (under torchrun with 2 ranks) in its own session; output to
    ``log``."""
    cmd = [sys.executable, "-m", "bombkd"]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "bombkd"]
    with open(log, "w") as out:
        return subprocess.Popen(cmd + args, env=child_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _run(args: list[str], log: Path, torchrun: bool = False) -> str:
    proc = _spawn(args, log, torchrun)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    return log.read_text()


def _wait_for_step(proc: subprocess.Popen, run: Path, step: int, log: Path) -> None:
    """Return once ``run``'s metrics hold ``step`` step records (the run still going)."""
    deadline = time.monotonic() + 240
    metrics = run / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count('"kind": "step"') >= step:
            return
        time.sleep(0.001)
    raise AssertionError(f"the run ended (or hung) before step {step}: "
                         f"{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def uninterrupted(cache, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("full") / "run"
    _run(_args(cache, run), run.parent / "log")
    return run


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "2"])
def test_kill_9_at_a_random_step_then_resume_is_the_uninterrupted_run(cache, uninterrupted,
                                                                      tmp_path, workers):
    run, step = tmp_path / "run", random.Random(workers).randint(1, 180)
    proc = _spawn(_args(cache, run, "--workers", workers), tmp_path / "killed.log")
    _wait_for_step(proc, run, step, tmp_path / "killed.log")
    os.killpg(proc.pid, signal.SIGKILL)  # the process and its loader workers, as a node failure
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert not (run / "fusion_ep2.pt").exists()
    _run(_args(cache, run, "--workers", workers, "--resume"), tmp_path / "resumed.log")
    assert_same_run(uninterrupted, run)


def _stopped(log: Path) -> tuple[str, int, Path]:
    found = STOPPED.findall(log.read_text())
    assert len(found) == 1, log.read_text()[-3000:]
    name, step, path = found[0]
    return name, int(step), Path(path)


@pytest.mark.slow
@pytest.mark.parametrize("sig,group,workers", [(signal.SIGTERM, False, "0"),
                                               (signal.SIGUSR1, True, "2")])
def test_a_stop_signal_finishes_the_step_checkpoints_and_says_how_to_resume(
        cache, uninterrupted, tmp_path, sig, group, workers):
    run = tmp_path / "run"
    log = tmp_path / "stopped.log"
    proc = _spawn(_args(cache, run, "--workers", workers), log)
    _wait_for_step(proc, run, random.Random(sig).randint(10, 170), log)
    # to the process alone (a scheduler's kill), or to its whole group with its loader workers
    # (a terminal, SLURM): the workers ignore it, the trainer stops
    (os.killpg if group else os.kill)(proc.pid, sig)
    assert proc.wait(timeout=60) == EXIT_PREEMPTED, log.read_text()[-3000:]
    name, step, path = _stopped(log)
    assert name == sig.name and path.is_file() and path.name.endswith(f"_step{step}.pt")
    assert records(run)[-1]["step"] == step  # nothing logged past the checkpoint
    _run(_args(cache, run, "--workers", workers, "--resume"), tmp_path / "resumed.log")
    assert_same_run(uninterrupted, run)


@pytest.mark.slow
def test_a_second_signal_exits_at_once(cache, tmp_path):
    run = tmp_path / "run"
    log = tmp_path / "stopped.log"
    proc = _spawn(_args(cache, run), log)
    _wait_for_step(proc, run, 20, log)
    os.kill(proc.pid, signal.SIGINT)
    os.kill(proc.pid, signal.SIGTERM)  # before the step ends: Python runs both handlers in turn
    assert proc.wait(timeout=60) == -signal.SIGTERM, log.read_text()[-3000:]
    text = log.read_text()
    assert "a second stop signal (SIGTERM): stopping now, without a checkpoint" in text
    assert "stopped by" not in text


def _ranks(torchrun: int) -> dict[int, int]:
    """RANK -> pid of the processes torchrun (pid ``torchrun``) started."""
    found = {}
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            stat = (environ.parent / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[1]) != torchrun:
                continue
            env = dict(v.split("=", 1) for v in environ.read_bytes().decode().split("\0")
                       if "=" in v)
        except (OSError, ValueError, IndexError):
            continue
        found[int(env["RANK"])] = int(environ.parent.name)
    return found


@pytest.mark.slow
def test_torchrun_ranks_stop_at_the_same_step_when_one_gets_the_signal(cache, tmp_path):
    full = tmp_path / "full"
    _run(_args(cache, full), tmp_path / "full.log", torchrun=True)
    run, log = tmp_path / "run", tmp_path / "stopped.log"
    proc = _spawn(_args(cache, run), log, torchrun=True)
    _wait_for_step(proc, run, 25, log)
    os.kill(_ranks(proc.pid)[1], signal.SIGTERM)  # to rank 1 only: rank 0 learns it from rank 1
    assert proc.wait(timeout=120) != 0
    name, step, path = _stopped(log)
    assert name == "a signal to another rank" and path.is_file()
    assert records(run)[-1]["step"] == step
    _run(_args(cache, run, "--resume"), tmp_path / "resumed.log", torchrun=True)
    assert_same_run(full, run)
