"""Featurize: clips/s of ``featurize`` (decode + student + teachers + shards), and the share of
its time spent writing shards (encoding, tar writing, hashing), as ``FeaturizeStats`` records it.

The twin with the features already in memory is the writing itself: ``write_s`` is timed around
the writer calls only, so a share near zero says the models, not the cache format, set the pace.
Each round is one whole run; the check judges the median of the rounds' shares.
"""
from __future__ import annotations

import itertools

from benchmarks.workloads import featurize_config
from bombkd_train.featurize import FeaturizeStats, featurize

WRITE_SHARE_MAX = 0.10


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
