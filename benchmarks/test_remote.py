"""Caches on object storage: the cached loader against a loopback S3 server (moto's server mode
in a child process, as in the tests), side by side with the plain download of the same objects.

A student cache of 4N ViT-L-sized samples in 16 shards (``benchmarks/scale.py``, N the size's
``scale_samples``, fp16 [8, 1024]) is written locally and uploaded to a bucket; then, in
alternating rounds:

    remote/loader     an epoch of the cached loader from ``s3://bucket/feats`` (no shard cache)
    remote/download   the same shard objects downloaded one after the other, whole, with the
                      same client library (s3fs ``cat_file``), nothing decoded
    cache/epoch2      an epoch of the cached loader from the S3 cache with a warm shard cache
                      (``shard_cache=DIR``: every shard verified on disk, nothing read remote)
    cache/local       an epoch of the cached loader from the local copy of the cache

Both loaders run in process (``num_workers=0``; the next shard is still read in a thread while
batches are cut): on 2 cores a worker process adds a fork and a fresh S3 session per epoch,
which this small cache cannot amortise. Checks (median of the per-round ratios): remote read >= 0.8 of the plain download; epoch 2
with the shard cache >= 0.9 of the local cache. The S3 server runs on the same 2 cores as the
loader, so both sides of a ratio pay for it alike.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from benchmarks.ledger import Workload
from benchmarks.scale import write_cache

REMOTE_READ_MIN = 0.8
SHARD_CACHE_MIN = 0.9
BATCH = 64


@pytest.fixture(scope="module")
def s3_cache(bench_dir, bench_size):
    """(local cache root, its S3 URL, samples): the scale benchmark's N cache, uploaded."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from s3_server import S3Server, isolated_env

    server = S3Server(bench_dir / "moto.log")
    saved = dict(os.environ)
    # straight to the server (the tests' counting proxy would be one more hop to pay for)
    os.environ.update(isolated_env(f"http://127.0.0.1:{server.port}", server.key,
                                   server.secret))
    root = bench_dir / "remote-src"
    count = 4 * bench_size.scale_samples  # 16 shards: the first one's wait is a small part
    write_cache(root, count, shard_size=max(1, bench_size.scale_samples // 4))
    url = server.upload(root, f"s3://{server.bucket()}/feats")
    yield root, url, count
    server.stop()
    os.environ.clear()
    os.environ.update(saved)


def _epoch(loader) -> int:
    return sum(len(b["key"]) for b in loader)


def test_remote_read_vs_plain_download(benchmark, ledger, s3_cache, bench_size):
    from bombkd_io.loaders.cached import make_cached_loader
    from bombkd_io.shards.manifest import load_manifest
    from bombkd_io.storage import filesystem

    root, url, count = s3_cache
    loader = make_cached_loader(url, "train", batch_size=BATCH, num_workers=0, pin_memory=False)
    shards = [f"{url}/{s.name}" for s in load_manifest(url, "train").models["student"].shards]
    fs, _ = filesystem(url)

    def download() -> int:
        return sum(len(fs.cat_file(filesystem(s)[1])) for s in shards) and count

    done = ledger.interleave(benchmark, [Workload("remote/loader", lambda: _epoch(loader), count),
                                         Workload("remote/download", download, count)],
                             rounds=bench_size.rounds, group="remote")
    assert done == {"remote/loader": count, "remote/download": count}
    ledger.compare("remote-read", "cached loader from S3 vs plain download of the same objects:",
                   "remote/loader", "remote/download", REMOTE_READ_MIN)


def test_shard_cache_epoch_two_vs_local(benchmark, ledger, s3_cache, bench_size, bench_dir):
    from bombkd_io.loaders.cached import make_cached_loader

    root, url, count = s3_cache
    cached = make_cached_loader(url, "train", batch_size=BATCH, num_workers=0, pin_memory=False,
                                shard_cache=bench_dir / "shard-cache")
    local = make_cached_loader(root, "train", batch_size=BATCH, num_workers=0, pin_memory=False)
    assert _epoch(cached) == count  # epoch 1: fills the shard cache
    assert cached.dataset.shard_cache.downloads == 16
    assert len(list((bench_dir / "shard-cache").glob("*/*.tar"))) == 16
    done = ledger.interleave(benchmark, [Workload("cache/epoch2", lambda: _epoch(cached), count),
                                         Workload("cache/local", lambda: _epoch(local), count)],
                             rounds=bench_size.rounds, group="remote")
    assert done == {"cache/epoch2": count, "cache/local": count}
    assert cached.dataset.shard_cache.downloads == 16  # epochs 2+ downloaded nothing
    ledger.compare("shard-cache", "epoch 2 from S3 with the shard cache vs a local cache:",
                   "cache/epoch2", "cache/local", SHARD_CACHE_MIN)
