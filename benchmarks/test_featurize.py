"""Featurize: clips/s of ``featurize`` (decode + student + teachers + shards), and the share of
its time spent writing shards (encoding, tar writing, hashing), as ``FeaturizeStats`` records it;
and the same run as two processes under torchrun against one, side by side.

The twin with the features already in memory is the writing itself: ``write_s`` is timed around
the writer calls only, so a share near zero says the models, not the cache format, set the pace.
Each round is one whole run; the check judges the median of the rounds' shares.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from benchmarks.ledger import Workload
from benchmarks.report import median
from benchmarks.workloads import DATASET, SPLIT, featurize_config, make_videos
from bombkd_io.datasets import index_dataset
from bombkd_train.featurize import FeaturizeStats, featurize

WRITE_SHARE_MAX = 0.10
TWO_PROCESSES_MIN = 0.9  # the same cache from 2 processes is not slower than from 1


def test_featurize(benchmark, ledger, corpus, bench_size, bench_dir):
    runs = itertools.count()
    stats: list[FeaturizeStats] = []

    def run() -> int:
        out = bench_dir / f"featurize-{next(runs)}"
        stats.append(FeaturizeStats())
        return featurize(featurize_config(corpus.videos, out, bench_size, "float16"),
                         stats=stats[-1]).count

    count = ledger.time(benchmark, "featurize/float16", run, count=corpus.count, unit="clips",
                        rounds=bench_size.rounds, warmup=0, group="featurize")
    assert count == corpus.count
    ledger.add("featurize/writing", count=corpus.count, seconds=[s.write_s for s in stats],
               unit="clips")
    shares = [s.write_s / s.total_s for s in stats]  # per round: the run's own two timings
    mid = sorted(stats, key=lambda s: s.clips_per_s)[len(stats) // 2]
    ledger.require(
        "featurize", f"{mid.clips_per_s:.1f} clips/s with {1 + len(bench_size.teachers)} models; "
        f"share of time writing shards", shares, "<=",
        bench_size.limit("featurize", WRITE_SHARE_MAX),
        details={"clips_per_s": mid.clips_per_s, "total_s": mid.total_s,
                 "write_s": mid.write_s, "models_s": sum(mid.infer_s.values()),
                 "decode_wait_s": mid.decode_wait_s, "probe_s": mid.probe_s})


# One process of ``torchrun``: featurize, and rank 0 writes the run's own time (from the call to
# the manifest: joining the process group, loading the models, probing, writing) to argv[2].
CHILD = """
import json, sys
from bombkd_train.config import FeaturizeConfig
from bombkd_train.featurize import FeaturizeStats, featurize
from bombkd_train.runtime import launch_rank
stats = FeaturizeStats()
featurize(FeaturizeConfig(**json.loads(sys.argv[1])), stats=stats)
if launch_rank() == 0:
    with open(sys.argv[2], "w") as f:
        json.dump({"total_s": stats.total_s, "clips": stats.clips}, f)
"""


def test_featurize_two_processes(benchmark, ledger, bench_size, bench_dir):
    """featurize as 2 processes under torchrun against 1, in alternating rounds, on sample
    videos six times the corpus' (so the run is longer than starting it). Judged: the run's
    own time (featurize's call to its manifest); printed beside it: the whole command, Python
    and torch start-up included, which on 2 shared cores the second process pays in full."""
    videos = make_videos(bench_dir / "videos-ranks", bench_size,
                         per_class=6 * bench_size.per_class)
    script = bench_dir / "featurize_rank.py"
    script.write_text(CHILD)
    runs, loads, digests, own = itertools.count(), [], {}, {1: [], 2: []}

    def command(procs: int) -> int:
        run = next(runs)
        cfg = featurize_config(videos, bench_dir / f"featurize-{procs}p-{run}", bench_size,
                               "float16")
        report = bench_dir / f"featurize-{procs}p-{run}.json"
        loads.append(os.getloadavg()[0])
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node", str(procs), str(script),
                               json.dumps(asdict(replace(cfg, progress=False))), str(report)],
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        done = json.loads(report.read_text())
        own[procs].append(done["total_s"])
        digests[procs] = _digests(Path(cfg.out))
        return done["clips"]

    count = len(index_dataset(DATASET, videos, SPLIT).items)
    done = ledger.interleave(benchmark, [
        Workload("featurize/1-process-command", lambda: command(1), count, "clips"),
        Workload("featurize/2-processes-command", lambda: command(2), count, "clips"),
    ], rounds=bench_size.rounds, warmup=0, group="featurize-ranks")
    assert set(done.values()) == {count}
    assert digests[1] == digests[2]  # every file, the manifest included
    for procs, key in ((1, "featurize/1-process"), (2, "featurize/2-processes")):
        ledger.add(key, count=count, seconds=own[procs], unit="clips")
    whole = ledger.ratios("featurize/2-processes-command", "featurize/1-process-command")
    print(f"featurize-2-processes: the whole command, start-up included (not judged): "
          f"{median(whole):.3g}x (rounds {', '.join(f'{r:.3g}' for r in whole)}); "
          f"1-minute load before each command: {', '.join(f'{x:.1f}' for x in loads)} on "
          f"{os.cpu_count()} cores")
    limit = bench_size.limit("featurize-2-processes", TWO_PROCESSES_MIN)
    if limit is None:
        own_ratios = ledger.ratios("featurize/2-processes", "featurize/1-process")
        rounds = ", ".join(f"{r:.3g}" for r in own_ratios)
        print(f"featurize-2-processes: featurize as 2 processes (torchrun) vs 1: median of "
              f"rounds {median(own_ratios):.3g}x (rounds {rounds})")
        pytest.skip("featurize-2-processes is checked on a CPU-only machine at --benchmark-size "
                    "full only: at small size beside one busy process it gives 0.88 .. 0.95, and "
                    "ranks run one after the other give 0.99; see README, Performance")
    ledger.compare("featurize-2-processes", "featurize as 2 processes (torchrun) vs 1:",
                   "featurize/2-processes", "featurize/1-process", limit,
                   rate="clips/s", details={"load_1min": loads, "cores": os.cpu_count(),
                                            "clips": count, "command_ratios": whole})


def _digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}
