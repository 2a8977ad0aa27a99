"""Kill `bombkd train` with -9 at random steps and resume it, in every configuration (loader x
cache dtype x --workers x ranks): each resumed run must end with the uninterrupted run's weights
and optimizer state (torch.equal on every tensor) and step records.

    python scripts/resume_matrix.py [--kills 5] [--seed 0] [--only wds|dali] [--out DIR]

A configuration's reference is one uninterrupted run per (loader, dtype, ranks), so --workers 0
and 2 are also checked against each other. Cached mode trains on a synthetic 960-sample cache
(fp32 and fp16), video mode on 12 sample videos replaying a featurized cache's plan. Each kill
takes the whole process group (torchrun, its ranks and their loader workers) at once, as a
node failure does. Prints one line per kill and a summary; exits 1 if any run differs.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the test suite's cache builder and checks

from same_run import assert_same_run  # noqa: E402
from synthetic_cache import TEACHERS, make_feature_cache  # noqa: E402

from bombkd_io.sample_data import make_sample_data  # noqa: E402
from bombkd_train.config import ConverterTrainConfig, FeaturizeConfig  # noqa: E402
from bombkd_train.converters import train_converters  # noqa: E402
from bombkd_train.featurize import featurize  # noqa: E402

STUDENT, TEACHER = "tiny-vjepa2", "tiny-vivit"


def make_data(out: Path) -> dict:
    """The caches, videos and converters every configuration trains on."""
    data = {}
    for dtype in ("float32", "float16"):
        root = make_feature_cache(out / f"synth-{dtype}", count=960, shard_size=64, dtype=dtype)
        data[f"wds-{dtype}"] = root
    data["wds-conv"] = train_converters(ConverterTrainConfig(
        root=str(data["wds-float32"]), split="train", teachers=list(TEACHERS), epochs=0,
        save_dir=str(out / "synth-conv"), batch_size=16, progress=False)).path
    videos = make_sample_data(out / "ucf", classes=6, per_class=3, codec="vp9", seed=0)
    data["videos"], data["cache"] = videos, out / "video-cache"
    featurize(FeaturizeConfig(dataset="ucf101", root=str(videos), split="train", student=STUDENT,
                              out=str(data["cache"]), teachers=[TEACHER], shard_size=2,
                              batch_size=3, decode_threads=2, progress=False))
    data["dali-conv"] = train_converters(ConverterTrainConfig(
        root=str(data["cache"]), split="train", teachers=[TEACHER], epochs=0, val_frac=0.0,
        save_dir=str(out / "video-conv"), progress=False)).path
    return data


def train_args(data: dict, loader: str, dtype: str, workers: int, run: Path) -> list[str]:
    if loader == "wds":
        return ["train", "--loader", "wds", "--root", str(data[f"wds-{dtype}"]), "--split",
                "train", "--teachers", ",".join(TEACHERS), "--converters",
                str(data["wds-conv"]), "--classes", "4", "--batch", "8", "--epochs", "2",
                "--save-every", "3", "--workers", str(workers), "--save-dir", str(run),
                "--device", "cpu", "--quiet"]
    return ["train", "--loader", "dali", "--root", str(data["videos"]), "--dataset", "ucf101",
            "--split", "train", "--student", STUDENT, "--cache", str(data["cache"]),
            "--teachers", TEACHER, "--converters", str(data["dali-conv"]), "--batch", "2",
            "--epochs", "2", "--save-every", "2", "--workers", str(workers), "--save-dir",
            str(run), "--device", "cpu", "--quiet"]


def spawn(args: list[str], ranks: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bombkd"]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(ranks), "-m", "bombkd"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        return subprocess.Popen(cmd + args, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def finish(args: list[str], ranks: int, log: Path) -> None:
    proc = spawn(args, ranks, log)
    if proc.wait(timeout=900) != 0:
        raise RuntimeError(f"{' '.join(args[:3])}... failed: {log.read_text()[-3000:]}")


def step_records(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    return metrics.read_text().count('"kind": "step"') if metrics.is_file() else 0


def kill_at(args: list[str], ranks: int, run: Path, step: int, log: Path) -> int | None:
    """Start the run, SIGKILL its process group once ``step`` steps are logged; the last step
    logged when it died (None: it finished first)."""
    proc = spawn(args, ranks, log)
    while proc.poll() is None and step_records(run) < step:
        time.sleep(0.001)
    if proc.poll() is not None:
        return None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return step_records(run)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5, help="kills per configuration")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill steps")
    parser.add_argument("--only", choices=("wds", "dali"), help="one loader's configurations")
    parser.add_argument("--out", type=Path, default=Path("resume-matrix"), help="work folder")
    opts = parser.parse_args()
    opts.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(opts.seed)
    t0 = time.perf_counter()
    data = make_data(opts.out / "data")
    print(f"data ready in {time.perf_counter() - t0:.0f} s", flush=True)
    configs = [(loader, dtype, workers, ranks)
               for loader, dtypes in (("wds", ("float32", "float16")), ("dali", ("video",)))
               if opts.only in (None, loader)
               for dtype in dtypes for ranks in (1, 2) for workers in (0, 2)]
    results, refs = [], {}
    for loader, dtype, workers, ranks in configs:
        name = f"{loader}-{dtype}-w{workers}-r{ranks}"
        ref = opts.out / f"ref-{loader}-{dtype}-r{ranks}"
        if ref not in refs:  # one uninterrupted run for both --workers
            ref.mkdir(parents=True, exist_ok=True)
            finish(train_args(data, loader, dtype, 0, ref / "run"), ranks, ref / "log")
            refs[ref] = step_records(ref / "run")
        total = refs[ref]
        for k in range(opts.kills):
            run = opts.out / name / f"kill{k}"
            args = train_args(data, loader, dtype, workers, run / "run")
            run.mkdir(parents=True, exist_ok=True)
            died = None
            while died is None:  # a run that finished before its kill step is drawn again
                want = rng.randint(1, total - 1)
                died = kill_at(args, ranks, run / "run", want, run / "killed.log")
            finish(args + ["--resume"], ranks, run / "resumed.log")
            try:
                assert_same_run(ref / "run", run / "run")
                same = True
            except AssertionError:
                same = False
            results.append({"config": name, "kill_at": want, "died_after_step": died,
                            "steps": total, "identical": same})
            print(f"{name}: killed after step {died}/{total} -> "
                  f"{'identical' if same else 'DIFFERENT'}", flush=True)
    bad = [r for r in results if not r["identical"]]
    print(f"{len(results) - len(bad)}/{len(results)} killed-and-resumed runs identical to the "
          f"uninterrupted run ({len(configs)} configurations, "
          f"{time.perf_counter() - t0:.0f} s)")
    (opts.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
