"""Caches on S3 (moto's server on loopback, behind a proxy that counts and cuts): the cached
loader, the shard cache, inspect, and the remote faults (a missing object, a wrong credential,
connections dropped mid-shard, a tampered object)."""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import bombkd_io.storage as storage
from bombkd_io.errors import ConfigError, DatasetError, MissingExtraError, ShardError
from bombkd_io.loaders.cached import make_cached_loader
import bombkd_io.shards.cache as cache_module
from bombkd_io.shards.cache import ShardCache, parse_size
from bombkd_io.shards.manifest import load_manifest
from bombkd_train.cli.main import app
from synthetic_cache import make_feature_cache

MODELS = ("student", "ta")


@pytest.fixture(scope="module")
def local_cache(tmp_path_factory):
    return make_feature_cache(tmp_path_factory.mktemp("cache"), count=48, shard_size=16)


@pytest.fixture
def remote(s3, local_cache):
    """The same cache uploaded to a new bucket: its URL."""
    return s3.upload(local_cache, f"s3://{s3.bucket()}/feats")


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)


def loader_of(root, **kw):
    return make_cached_loader(root, "train", models=MODELS, batch_size=8, seed=3, **kw)


def epochs(root, epochs=(0, 1), **kw) -> list[list[tuple]]:
    """Per epoch, each batch's (keys, labels, student bytes, ta bytes); ``root``: a cache or a
    loader."""
    loader = loader_of(root, **kw) if isinstance(root, (str, Path)) else root
    out = []
    for e in epochs:
        loader.set_epoch(e)
        out.append([(tuple(b["key"]), b["label"].tolist(), b["student"].numpy().tobytes(),
                     b["ta"].numpy().tobytes()) for b in loader])
    return out


def test_loader_from_s3_gives_the_local_batches(s3, remote, local_cache):
    assert epochs(remote, num_workers=1) == epochs(local_cache, num_workers=1)
    assert s3.proxy.bytes_down > 2 * 3 * 16 * 4 * 16 * 4  # the shards came over the wire


def test_shard_cache_epoch_two_reads_nothing_remote(s3, remote, local_cache, tmp_path):
    loader = loader_of(remote, shard_cache=tmp_path / "sc", num_workers=0)
    local = epochs(local_cache, num_workers=0)
    got = []
    for e, requests in ((0, "some"), (1, 0)):
        s3.proxy.reset()
        got += epochs(loader, epochs=(e,))
        if requests == 0:
            assert (s3.proxy.requests, s3.proxy.bytes_down) == (0, 0)
        else:
            assert s3.proxy.requests >= 6 and s3.proxy.bytes_down > 0
    assert got == local
    kept = sorted(p.name for p in (tmp_path / "sc").glob("*/*.tar"))
    assert kept == sorted(p.name for p in local_cache.glob("*-student-*.tar")) + \
        sorted(p.name for p in local_cache.glob("*-ta-*.tar"))
    # another rank of this node, sharing the folder: reads the manifest, finds every shard there
    other = loader_of(remote, shard_cache=tmp_path / "sc", num_workers=0, rank=1, world_size=2)
    s3.proxy.reset()
    assert epochs(other, epochs=(2,))[0]
    assert (s3.proxy.requests, s3.proxy.bytes_down) == (0, 0)


def test_shard_cache_evicts_least_recently_used(s3, remote, tmp_path, monkeypatch):
    m = load_manifest(remote, "train")
    shards = m.models["student"].shards
    cache = ShardCache(tmp_path / "sc", limit=2 * shards[0].bytes)
    monkeypatch.setattr(cache_module, "IN_USE_S", 0.0)  # nothing is being read meanwhile
    for entry in shards:  # 0, 1, then 2 pushes out 0 (the oldest)
        cache.fetch(f"{remote}/{entry.name}", entry)
        time.sleep(0.01)  # distinct mtimes
    assert sorted(p.name for p in (tmp_path / "sc").glob("*/*.tar")) == \
        [shards[1].name, shards[2].name]
    cache.fetch(f"{remote}/{shards[1].name}", shards[1])  # a hit: 1 is now the newest
    time.sleep(0.01)
    cache.fetch(f"{remote}/{shards[0].name}", shards[0])  # pushes out 2
    assert sorted(p.name for p in (tmp_path / "sc").glob("*/*.tar")) == \
        [shards[0].name, shards[1].name]
    assert cache.downloads == 4
    # a shard used within IN_USE_S seconds is never evicted: the folder may go over the limit
    monkeypatch.setattr(cache_module, "IN_USE_S", 3600.0)
    cache.fetch(f"{remote}/{shards[2].name}", shards[2])
    assert len(list((tmp_path / "sc").glob("*/*.tar"))) == 3


def test_shard_cache_refuses_an_object_that_does_not_verify(s3, remote, tmp_path):
    entry = load_manifest(remote, "train").models["student"].shards[1]
    bucket, prefix = remote[5:].split("/", 1)
    s3.client().put_object(Bucket=bucket, Key=f"{prefix}/{entry.name}",
                           Body=b"\0" * entry.bytes)  # same size, other bytes
    with pytest.raises(ShardError, match=f"{entry.name}: downloaded {entry.bytes} bytes, sha256"):
        ShardCache(tmp_path / "sc").fetch(f"{remote}/{entry.name}", entry)
    kept = [p.name for p in (tmp_path / "sc").glob("*/*") if not p.name.endswith(".lock")]
    assert kept == []  # nothing kept, no temp file left


def test_missing_object_is_named_or_skipped(s3, remote):
    bucket, prefix = remote[5:].split("/", 1)
    s3.client().delete_object(Bucket=bucket, Key=f"{prefix}/synth-train-ta-000001.tar")
    with pytest.raises(ShardError, match=r"synth-train-ta-000001\.tar: no such object"):
        epochs(remote, epochs=(0,), num_workers=0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = epochs(remote, epochs=(0,), num_workers=0, on_error="skip")[0]
    assert sum(len(keys) for keys, *_ in got) == 32  # shard 1 (16 samples) left out
    assert any("synth-train-ta-000001.tar: no such object" in str(w.message) for w in seen)


@pytest.mark.parametrize("wrong", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"])
def test_wrong_credential_names_the_url_and_the_source(s3, remote, monkeypatch, wrong):
    monkeypatch.setenv(wrong, "WRONGWRONGWRONG")
    with pytest.raises(DatasetError) as err:
        make_cached_loader(remote, "train")
    text = str(err.value)
    assert f"{remote}: access denied" in text
    assert "the environment's AWS_ACCESS_KEY_ID at endpoint http://127.0.0.1:" in text
    assert "WRONGWRONGWRONG" not in text and s3.secret not in text  # no secret is shown


def test_dropped_connections_are_retried_then_reported_or_skipped(s3, remote, local_cache,
                                                                  fast_retries):
    expected = epochs(local_cache, epochs=(0,), num_workers=0)
    loader, skipping = (loader_of(remote, num_workers=0, on_error=e) for e in ("raise", "skip"))
    s3.proxy.cut_after(3000, 2)  # two connections reset mid-shard: retried, same batches
    assert epochs(loader, epochs=(0,)) == expected
    s3.proxy.cut_after(3000, 10_000)  # every connection: reported after the retries
    with pytest.raises(ShardError, match=r"synth-train-student-00000\d\.tar: failed 5 times with "
                                         r"transient errors, the last ClientPayloadError"):
        epochs(loader, epochs=(0,))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = epochs(skipping, epochs=(0,))[0]
    assert sum(len(keys) for keys, *_ in got) == 0  # every shard skipped, after its retries
    assert sum("failed 5 times" in str(w.message) for w in seen) == 6  # 3 shards x 2 models


def test_inspect_and_verify_from_s3(s3, remote):
    result = CliRunner().invoke(app, ["inspect", remote, "--verify", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "48" in result.output and "verify: ok" in result.output
    entry = load_manifest(remote, "train").models["ta"].shards[2]
    bucket, prefix = remote[5:].split("/", 1)
    s3.client().put_object(Bucket=bucket, Key=f"{prefix}/{entry.name}", Body=b"\0" * 10)
    result = CliRunner().invoke(app, ["inspect", remote, "--verify", "--quiet"])
    assert result.exit_code == 2
    assert f"{remote}/{entry.name}: 10 bytes" in result.output


def test_a_url_root_with_nothing_under_it(s3):
    url = f"s3://{s3.bucket()}/nothing"
    with pytest.raises(DatasetError, match=f"{url}: nothing under this URL"):
        make_cached_loader(url, "train")


def test_schemes_and_extras(monkeypatch):
    with pytest.raises(ConfigError, match="unknown URL scheme 'ftp'"):
        storage.check_root("ftp://host/feats", "--root")
    with pytest.raises(ConfigError, match="https:// is read only"):
        storage.check_root("https://host/feats", "--out", write=True)
    storage.check_root("s3://bucket/feats", "--out", write=True)
    monkeypatch.setitem(__import__("sys").modules, "gcsfs", None)  # as if not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'bombkd\[gcs\]'"):
        storage.filesystem("gs://bucket/feats")


def test_parse_size():
    assert parse_size("50G") == 50 << 30 and parse_size("800MiB") == 800 << 20
    assert parse_size("1.5k") == 1536 and parse_size("123") == 123
    with pytest.raises(ConfigError, match="--shard-cache-limit 'lots'"):
        parse_size("lots")


def test_transient_errors_are_classified():
    assert storage.is_transient(ConnectionResetError(104, "Connection reset by peer"))
    assert storage.is_transient(OSError("An error occurred (SlowDown) when calling GetObject"))
    assert not storage.is_transient(FileNotFoundError("bucket/x.tar"))
    assert not storage.is_transient(PermissionError("AccessDenied"))
    assert np.isfinite(storage.BACKOFF_S)


def test_import_cache_to_s3(s3, tmp_path):
    from test_import_cache import write_tc

    src = write_tc(tmp_path / "tc", "npy_dir")
    url = f"s3://{s3.bucket()}/imported"
    local = CliRunner().invoke(app, ["import-cache", str(src), "--out", str(tmp_path / "out"),
                                     "--quiet"])
    remote = CliRunner().invoke(app, ["import-cache", str(src), "--out", url, "--quiet"])
    assert (local.exit_code, remote.exit_code) == (0, 0), remote.output
    bucket, prefix = url[5:].split("/", 1)
    client = s3.client()
    objects = {k: client.get_object(Bucket=bucket, Key=f"{prefix}/{k}")["Body"].read()
               for k in s3.keys(url)}
    assert objects == {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()
                       if not p.name.startswith(".")}
    again = CliRunner().invoke(app, ["import-cache", str(src), "--out", url, "--quiet"])
    assert again.exit_code == 2 and "nothing is overwritten" in again.output
    assert load_manifest(url, "train").count == 7  # the imported cache reads from the bucket


def test_read_meta_from_s3(s3, remote, local_cache):
    """Video mode's --cache reads the student shards' KEY.json: from a URL as from a folder."""
    from bombkd_io.shards.reader import read_meta

    name = load_manifest(remote, "train").models["student"].shards[2].name
    assert list(read_meta(f"{remote}/{name}")) == list(read_meta(local_cache / name))
    assert len(list(read_meta(local_cache / name))) == 16


def test_throttling_is_retried_then_reported(s3, remote, local_cache, fast_retries):
    loader = loader_of(remote, num_workers=0)
    s3.proxy.throttle(3)  # 503 SlowDown three times: retried
    assert epochs(loader, epochs=(0,)) == epochs(local_cache, epochs=(0,), num_workers=0)
    s3.proxy.throttle(10_000)
    with pytest.raises(ShardError, match=r"-00000\d\.tar: failed 5 times with transient errors"):
        epochs(loader, epochs=(0,))


def test_http_root_is_read_only_and_reads(local_cache, tmp_path):
    """A cache served over plain HTTP (python's http.server on 127.0.0.1): read, not written."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                directory=str(local_cache))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        for kw in ({}, {"dataset": "synth"}):  # found through the listing page, or by name
            assert epochs(url, epochs=(0,), num_workers=0, **kw) == \
                epochs(local_cache, epochs=(0,), num_workers=0)
        result = CliRunner().invoke(app, ["import-cache", str(tmp_path), "--out", url])
        assert result.exit_code == 2 and "is read only" in result.output
    finally:
        server.shutdown()
