"""The shard reader on its own, and at scale.

Caches of N and 4N samples of ViT-L-sized student features (``benchmarks/scale.py``; N is the
size's ``scale_samples``) are written with the library's writer, then:

    read/reader    ``read_shard`` (the cached loader's read path) over every shard of the N cache
    read/raw       the same files read sequentially in 1 MiB chunks, nothing decoded
                   (both from storage: each round first drops these files from the page cache)
    scale/1x, 4x   the cached training loader over each cache, an epoch of each in turn in one
                   fresh process; then each alone in a fresh process, for its peak RSS

Checks (time: the median of the per-round ratios): the reader keeps at least 0.3 of the raw
read speed of the same bytes; at 4N a sample costs at most 1.25x its time at N; peak RSS grows
by at most 10% while the data grows 4x (the loader streams shards, it never holds the dataset).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.ledger import Workload
from benchmarks.scale import drop_from_page_cache, write_cache
from bombkd_io.shards.manifest import load_manifest
from bombkd_io.shards.reader import read_shard

HERE = Path(__file__).resolve().parent
READER_VS_RAW_MIN = 0.30
PER_SAMPLE_RATIO_MAX = 1.25
RSS_RATIO_MAX = 1.10
CHUNK = 1 << 20


@pytest.fixture(scope="module")
def scale_caches(bench_dir, bench_size):
    """factor -> (cache root, bytes): the N and 4N caches, written once."""
    out = {}
    for factor in (1, 4):
        root = bench_dir / f"scale-{factor}x"
        # shards of a quarter of N: the 1x cache has several shards, so "a shard or two in
        # memory" is already its steady state, as it is at 4x
        out[factor] = (root, write_cache(root, factor * bench_size.scale_samples,
                                         shard_size=max(1, bench_size.scale_samples // 4)))
    os.sync()  # written pages must be clean before they can be dropped from the page cache
    return out


def test_reader_vs_raw(benchmark, ledger, scale_caches, bench_size):
    root, size = scale_caches[1]
    model = load_manifest(root, "train").models["student"]
    shards = [root / s.name for s in model.shards]

    def with_reader() -> int:
        # the cached loader's read path: every tar header and tensor header checked, features
        # as one [count, T', D] array per shard
        drop_from_page_cache(shards)
        return sum(len(read_shard(str(path), entry, model, labels=True).keys)
                   for path, entry in zip(shards, model.shards))

    def raw() -> int:
        drop_from_page_cache(shards)
        total = 0
        for path in shards:
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(CHUNK):
                    total += len(chunk)
        return total

    done = ledger.interleave(benchmark, [Workload("read/reader", with_reader, size, "bytes"),
                                         Workload("read/raw", raw, size, "bytes")],
                             rounds=bench_size.rounds + 2, group="read")
    assert done == {"read/reader": bench_size.scale_samples, "read/raw": size}
    ledger.compare("reader-vs-raw", "shard reader vs raw sequential read of the same bytes:",
                   "read/reader", "read/raw", bench_size.limit("reader-vs-raw", READER_VS_RAW_MIN),
                   per=1e6, rate="MB/s")


def _read_in_subprocess(roots: list[Path], epochs: int) -> dict:
    cmd = [sys.executable, str(HERE / "scale.py"), *map(str, roots), "--epochs", str(epochs)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_scale_read(ledger, scale_caches, bench_size):
    """Time: the 1x and 4x caches read in one fresh process, an epoch of each in turn (the first
    epoch of each is warm-up). Memory: each cache read alone in a fresh process, for its peak."""
    factors = (1, 4)
    timed = _read_in_subprocess([scale_caches[f][0] for f in factors],
                                2 * bench_size.rounds + 1)
    for factor, samples, seconds in zip(factors, timed["samples"], timed["seconds"]):
        assert samples == factor * bench_size.scale_samples
        ledger.add(f"scale/{factor}x", count=samples, seconds=seconds[1:])
    for factor in factors:
        alone = _read_in_subprocess([scale_caches[factor][0]], 3)
        m = ledger.get(f"scale/{factor}x")
        ledger.notes.setdefault("scale", {})[factor] = {
            "samples": m.count, "bytes": scale_caches[factor][1],
            "per_sample_s": m.median_s / m.count, "peak_rss_kib": alone["peak_rss_kib"],
            "rss_before_kib": alone["rss_before_kib"]}


def test_scale_cost_per_sample(ledger, bench_size):
    one, four = _scale(ledger, 1), _scale(ledger, 4)
    # per round: time per sample at 4x over time per sample at 1x = rate at 1x over rate at 4x
    rounds = ledger.ratios("scale/1x", "scale/4x")
    ledger.require(
        "scale-time", f"time per sample at 4x ({four['samples']}) vs 1x ({one['samples']}) "
        "samples, cached loader", rounds, "<=",
        bench_size.limit("scale-time", PER_SAMPLE_RATIO_MAX), unit="x",
        details={"per_sample_us_1x": 1e6 * one["per_sample_s"],
                 "per_sample_us_4x": 1e6 * four["per_sample_s"]})


def test_scale_peak_rss(ledger, bench_size):
    one, four = _scale(ledger, 1), _scale(ledger, 4)
    ratio = four["peak_rss_kib"] / one["peak_rss_kib"]
    ledger.require(
        "scale-rss", f"peak RSS at 4x {four['peak_rss_kib'] / 1024:.0f} MiB vs 1x "
        f"{one['peak_rss_kib'] / 1024:.0f} MiB (data {four['bytes'] / 2**20:.0f} vs "
        f"{one['bytes'] / 2**20:.0f} MiB)", ratio, "<=",
        bench_size.limit("scale-rss", RSS_RATIO_MAX), unit="x",
        details={k: {f: v for f, v in _scale(ledger, k).items() if f != "seconds"}
                 for k in (1, 4)})


def _scale(ledger, factor: int) -> dict:
    found = ledger.notes.get("scale", {}).get(factor)
    if found is None:
        pytest.skip("needs test_scale_read from the same run")
    return found
