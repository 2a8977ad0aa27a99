"""Shard writer, reader, verification and manifest; the committed golden cache stays readable."""
from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from dataclasses import replace
from pathlib import Path

import msgpack
import numpy as np
import pytest
import webdataset as wds

from bombkd_io.errors import ConfigError, DatasetError, ErrorPolicy, FormatError, ShardError
from bombkd_io.shards.codec import decode_label, decode_tensor
from bombkd_io.shards.manifest import (Manifest, ModelEntry, ShardEntry, load_manifest,
                                       manifest_path, read_manifest, save_manifest)
from bombkd_io.shards import reader
from bombkd_io.shards.reader import _make_resident, _resident, read_shard
from bombkd_io.shards.tar import iter_samples, read_regular
from bombkd_io.shards.verify import verify_cache, verify_shard
from bombkd_io.shards.writer import ShardSetWriter
from places import GOLDEN, REPO, child_env

GOLDEN_KEYS = ["000000_v_jump_g01_c01", "000001_v_run_g01_c01", "000002_v_jump_g02_c01"]


def golden_student(i: int) -> np.ndarray:
    return ((np.arange(8, dtype=np.float32).reshape(2, 4) - 3) * 0.5 + i).astype(np.float16)


def golden_teacher(i: int) -> np.ndarray:
    return (np.array([[-1, -0.5, 0, 0.25, 1, 2]], np.float32) * (i + 1)).astype(np.float16)


def write_set(root, n=5, shard_size=2, model="student", dtype="float16", shape=(3, 4)):
    w = ShardSetWriter(root, "ds", "train", model, shard_size, dtype)
    for i in range(n):
        extra = {"cls": i % 3, "json": {"path": f"v{i}.avi"}} if model == "student" else None
        w.write(f"{i:06d}_v{i}", np.full(shape, i, np.float32) + np.arange(shape[-1]), extra)
    return w.close()


# ---- golden ------------------------------------------------------------------------------------

def test_golden_manifest_and_committed_bytes():
    m = load_manifest(GOLDEN, "train")
    assert (m.dataset, m.count, m.shard_size, m.classes) == ("golden", 3, 2, ["jump", "run"])
    assert list(m.models) == ["student", "videomae"]
    assert (m.models["student"].tokens, m.models["student"].dim) == (2, 4)
    assert m.failed == [{"path": "videos/v_run_g02_c01.avi", "reason": "no decodable frame"}]
    for model in m.models.values():
        for s in model.shards:
            data = (GOLDEN / s.name).read_bytes()
            assert len(data) == s.bytes and hashlib.sha256(data).hexdigest() == s.sha256


def read_set(root: Path, model: ModelEntry) -> list:
    """Every shard of one model's set, as the cached loader reads it."""
    return [read_shard(root / s.name, s, model, labels=model.name == "student")
            for s in model.shards]


def test_golden_tar_member_names_and_values():
    with tarfile.open(GOLDEN / "golden-train-student-000000.tar") as tar:
        assert tar.getnames() == [f"{k}.{s}" for k in GOLDEN_KEYS[:2]
                                  for s in ("cls", "json", "student.mp")]
        assert tar.extractfile("000001_v_run_g01_c01.cls").read() == b"1"
        meta = json.loads(tar.extractfile("000000_v_jump_g01_c01.json").read())
    assert meta["frame_indices"] == [0, 2, 4, 6]
    m = load_manifest(GOLDEN, "train")
    student, teacher = read_set(GOLDEN, m.models["student"]), read_set(GOLDEN, m.models["videomae"])
    assert [k for d in student for k in d.keys] == GOLDEN_KEYS
    assert [c for d in student for c in d.labels.tolist()] == [0, 1, 0]
    np.testing.assert_array_equal(np.concatenate([d.features for d in student]),
                                  [golden_student(i) for i in range(3)])
    np.testing.assert_array_equal(np.concatenate([d.features for d in teacher]),
                                  [golden_teacher(i) for i in range(3)])


def test_writer_still_reproduces_the_golden_bytes(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from make_golden import make_golden
    finally:
        sys.path.pop(0)
    make_golden(tmp_path)
    for f in GOLDEN.iterdir():
        assert (tmp_path / f.name).read_bytes() == f.read_bytes(), f.name


def test_golden_reads_with_webdataset():
    urls = [str(GOLDEN / f"golden-train-student-00000{k}.tar") for k in (0, 1)]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == GOLDEN_KEYS
    for i, s in enumerate(samples):
        np.testing.assert_array_equal(decode_tensor(s["student.mp"]), golden_student(i))
        assert int(s["cls"]) == [0, 1, 0][i]


# ---- writer --------------------------------------------------------------------------------------

def test_writer_shards_counts_hashes(tmp_path):
    entries = write_set(tmp_path, n=5, shard_size=2)
    assert [e.name for e in entries] == [f"ds-train-student-00000{k}.tar" for k in range(3)]
    assert [e.count for e in entries] == [2, 2, 1]
    for e in entries:
        data = (tmp_path / e.name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (e.bytes, e.sha256)
    assert not list(tmp_path.glob("*.tmp"))


def test_writer_is_deterministic(tmp_path):
    a, b = write_set(tmp_path / "a"), write_set(tmp_path / "b")
    assert [e.sha256 for e in a] == [e.sha256 for e in b]


def test_writer_casts_to_the_set_dtype(tmp_path):
    (e,) = write_set(tmp_path, n=1, dtype="float32", model="videomae")
    data = read_shard(tmp_path / e.name, e, model_entry([e], "videomae", dtype="float32"),
                      labels=False)
    assert data.features.dtype == np.float32


@pytest.mark.parametrize("key", ["a.b", "dir/key", "", "k y", "x" * 95])
def test_writer_refuses_bad_keys(tmp_path, key):
    w = ShardSetWriter(tmp_path, "ds", "train", "student", 2)
    with pytest.raises(ShardError, match="key"):
        w.write(key, np.zeros((1, 2)), {"cls": 0, "json": {}})


def test_writer_refuses_shape_change_and_bad_config(tmp_path):
    with ShardSetWriter(tmp_path, "ds", "train", "student", 2) as w:
        w.write("a", np.zeros((1, 2)))
        with pytest.raises(ShardError, match=r"shape \(1, 3\)"):
            w.write("b", np.zeros((1, 3)))
    with pytest.raises(ConfigError) as info:
        ShardSetWriter(tmp_path, "ds", "train", "bad.name", 0, "float64")
    assert len(info.value.problems) == 3


def test_writer_refuses_fp16_overflow(tmp_path):
    with ShardSetWriter(tmp_path, "ds", "train", "student", 2) as w:
        with pytest.raises(ShardError, match="overflow float16.*float32"):
            w.write("a", np.full((1, 2), 1e6, np.float32))


def test_abort_leaves_no_partial_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardSetWriter(tmp_path, "ds", "train", "student", 2) as w:
            for i in range(3):
                w.write(f"k{i}", np.zeros((1, 2)))
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds-train-student-000000.tar"]


def test_abort_mid_shard_removes_the_temp_file_and_keeps_finished_shards(tmp_path):
    w = ShardSetWriter(tmp_path, "ds", "train", "student", 3)
    for i in range(4):
        w.write(f"k{i}", np.zeros((1, 2)))
    assert len(list(tmp_path.glob("*.tar.tmp"))) == 1  # shard 1 is half written
    w.abort()
    w.abort()  # nothing left to drop: a no-op
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds-train-student-000000.tar"]


def test_abort_removes_the_temp_file_when_closing_the_tar_fails(tmp_path):
    w = ShardSetWriter(tmp_path, "ds", "train", "student", 3)
    w.write("k0", np.zeros((1, 2)))
    w._file.file.close()  # the disk went away: the tar's end blocks cannot be written
    with pytest.raises(ValueError, match="closed file"):
        w.abort()
    assert list(tmp_path.iterdir()) == []
    w.abort()  # the writer is already clean


# ---- reader ------------------------------------------------------------------------------------

def model_entry(entries, model="student", shape=(3, 4), dtype="float16"):
    return ModelEntry(model, "tiny", shape[1], shape[0], 4, 32, "time", dtype, entries)


@pytest.mark.parametrize("mapped", [False, True])
def test_read_shard_and_urls(tmp_path, mapped):
    entries = write_set(tmp_path, n=3, shard_size=3)
    path = tmp_path / entries[0].name
    for url in (str(path), f"file:{path}", f"pipe:cat {path}"):  # a pipe is read, never mapped
        data = read_shard(url, entries[0], model_entry(entries), labels=True, mapped=mapped)
        assert (data.file is not None) == (mapped and not url.startswith("pipe:"))
        assert data.keys == ["000000_v0", "000001_v1", "000002_v2"]
        assert data.labels.tolist() == [0, 1, 2] and data.present.all()
        np.testing.assert_array_equal(data.features[:, 0, :], [np.arange(4) + i for i in range(3)])


def test_reader_handles_pax_and_long_names(tmp_path):
    """Tars from other writers (pax headers, names > 100 chars) still read."""
    path, key = tmp_path / "pax.tar", "k" * 120
    payload = msgpack.packb({"dtype": "float16", "shape": [1, 1], "data": b"\x00\x3c"})
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(f"{key}.student.mp")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    raw = path.read_bytes()
    entry = ShardEntry(path.name, 1, len(raw), hashlib.sha256(raw).hexdigest())
    data = read_shard(path, entry, model_entry([entry], shape=(1, 1)), labels=False)
    assert data.keys == [key] and data.features.tolist() == [[[1.0]]]


def corrupt(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("mapped", [False, True])
def test_truncated_shard_names_shard_and_sample(tmp_path, mapped):
    (e,) = write_set(tmp_path, n=3, shard_size=3)
    path = tmp_path / e.name
    path.write_bytes(path.read_bytes()[:4000])
    # a local file is measured before anything is allocated for it (or mapped)
    with pytest.raises(ShardError, match=f"4000 bytes on disk, the manifest lists {e.bytes}"):
        read_shard(str(path), e, model_entry([e]), labels=True, mapped=mapped)
    # a stream (no size up front) is read to where it ends
    with pytest.raises(ShardError, match="truncated") as info:
        read_shard(f"pipe:cat {path}", e, model_entry([e]), labels=True)
    assert info.value.shard == f"pipe:cat {path}" and info.value.sample is not None


@pytest.mark.parametrize("mapped", [False, True])
def test_corrupt_member_and_header(tmp_path, mapped):
    (e,) = write_set(tmp_path, n=3, shard_size=3)
    path = tmp_path / e.name
    good = path.read_bytes()
    # payload of the first sample's .student.mp member: header at 2048, data at 2560
    corrupt(path, 2560, b"\xc1\xc1")
    with pytest.raises(ShardError, match="msgpack") as info:
        read_shard(str(path), e, model_entry([e]), labels=True, mapped=mapped)
    assert info.value.sample == "000000_v0"
    path.write_bytes(good)
    corrupt(path, 0, b"X")  # first header's name: checksum no longer matches
    with pytest.raises(ShardError, match="checksum"):
        read_shard(str(path), e, model_entry([e]), labels=True, mapped=mapped)


def on_a_mapping(array: np.ndarray) -> bool:
    """Is ``array`` (made by ``np.frombuffer``) a view of a file's mapping?"""
    base = array.base
    return isinstance(getattr(base, "obj", base), mmap.mmap)


@pytest.mark.parametrize("mapped", [False, True])
def test_skip_counts_and_warns(tmp_path, mapped, monkeypatch):
    (e,) = write_set(tmp_path, n=3, shard_size=3)
    path = tmp_path / e.name
    corrupt(path, 2560, b"\xc1\xc1")
    policy = ErrorPolicy("skip")
    walked, walk = [], reader._walk  # what the walk of the irregular shard reads from
    monkeypatch.setattr(reader, "_walk", lambda view, *a: walked.append(view.obj) or walk(view, *a))
    with pytest.warns(RuntimeWarning, match="skipped 1 sample.*featurize --resume"):
        data = read_shard(str(path), e, model_entry([e]), labels=True, policy=policy,
                          mapped=mapped)
    assert data.present.tolist() == [False, True, True] and policy.samples == 1
    # walked from a read, never through a mapping (which a shard cut short would fault)
    assert len(walked) == 1 and not on_a_mapping(walked[0])
    path.write_bytes(path.read_bytes()[:4000])  # truncated in sample 1: 2 lost
    with pytest.warns(RuntimeWarning):
        data = read_shard(f"pipe:cat {path}", e, model_entry([e]), labels=True, policy=policy)
    # the stream ends inside sample 1, before sample 0 is complete: both lost, and sample 2
    assert data.present.tolist() == [False, False, False] and policy.samples == 4
    assert len(policy.problems) == 2 and "000001_v1" in policy.problems[1]
    assert policy.fresh() == ErrorPolicy("skip")


@pytest.mark.parametrize("mapped", [False, True])
def test_missing_labels_and_count_mismatch(tmp_path, mapped):
    (e,) = write_set(tmp_path, n=2, shard_size=2, model="videomae")
    with pytest.raises(ShardError, match="Cached features do not contain labels"):
        read_shard(str(tmp_path / e.name), e, model_entry([e], "videomae"), labels=True,
                   mapped=mapped)
    wrong = type(e)(e.name, 3, e.bytes, e.sha256)
    with pytest.raises(ShardError, match="holds 2 samples, the manifest lists 3"):
        read_shard(str(tmp_path / e.name), wrong, model_entry([wrong], "videomae"), labels=False,
                   mapped=mapped)


def test_verify_shard(tmp_path):
    (e,) = write_set(tmp_path, n=2, shard_size=2)
    path = str(tmp_path / e.name)
    assert verify_shard(path, e)
    assert not verify_shard(path, type(e)(e.name, 3, e.bytes, e.sha256))
    assert verify_shard(path, type(e)(e.name, 2, e.bytes, ""))  # sha256 not recorded yet
    assert not verify_shard(str(tmp_path / "missing.tar"), e)
    corrupt(tmp_path / e.name, 2600, b"\x01")
    assert not verify_shard(path, e)


# ---- manifest ----------------------------------------------------------------------------------

def copy_golden(tmp_path) -> Path:
    root = tmp_path / "golden"
    shutil.copytree(GOLDEN, root)
    return root


def test_manifest_round_trip_and_atomic_write(tmp_path):
    m = load_manifest(GOLDEN, "train")
    path = save_manifest(m, tmp_path)
    assert path == manifest_path(tmp_path, "golden", "train")
    assert read_manifest(path) == m and [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("field, value, message", [
    ("format", "webdataset", "expected 'bombkd-features'"),
    ("version", 2, "expected version 1"),
    ("count", 4, "do not split count=4"),
])
def test_manifest_refuses_other_format_version_and_inconsistency(tmp_path, field, value, message):
    root = copy_golden(tmp_path)
    path = root / "golden-train.index.json"
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data))
    with pytest.raises(FormatError, match=message) as info:
        load_manifest(root, "train")
    assert str(path) in str(info.value)


def test_missing_manifest_lists_the_directory(tmp_path):
    (tmp_path / "features_ucf101_train.index.json").write_text("{}")
    with pytest.raises(DatasetError) as info:
        load_manifest(tmp_path, "train")
    message = str(info.value)
    assert "features_ucf101_train.index.json" in message and "bombkd import-cache" in message
    with pytest.raises(DatasetError, match="no such cache directory"):
        load_manifest(tmp_path / "nope", "train")


def test_model_entry_json_round_trip_and_contradictions():
    e = load_manifest(GOLDEN, "train").models["student"]
    assert "name" not in e.to_json() and ModelEntry.from_json("student", e.to_json(), e.shards) == e
    assert e.contradictions(backbone="tiny-vjepa2", frames=None, size=64) == {"size": (32, 64)}
    with pytest.raises(TypeError, match="expected an integer"):
        ModelEntry.from_json("student", {**e.to_json(), "dim": "4"})


def test_model_lookup_lists_available():
    m = load_manifest(GOLDEN, "train")
    with pytest.raises(DatasetError, match=r"'vivit'.*\['student', 'videomae'\]"):
        m.model("vivit")


def test_verify_cache_names_the_bad_shard(tmp_path):
    root = copy_golden(tmp_path)
    m = load_manifest(root, "train")
    assert verify_cache(root, m, progress=False) == []
    corrupt(root / "golden-train-videomae-000001.tar", 600, b"\xff")
    problems = verify_cache(root, m, progress=False)
    assert problems and all("golden-train-videomae-000001.tar" in p for p in problems)


def test_save_refuses_inconsistent_manifest(tmp_path):
    m = Manifest("ds", "train", [], 2, {"student": model_entry([], shape=(1, 2))}, 1)
    with pytest.raises(FormatError, match="inconsistent"):
        save_manifest(m, tmp_path)


# ---- the vectorised path for regular shards ----------------------------------------------------

def walk(path: Path) -> list[tuple[str, np.ndarray, int]]:
    """(key, student features, label) of each sample, by the member walk and the codec."""
    with open(path, "rb") as f:
        return [(key, decode_tensor(fields["student.mp"]), decode_label(fields["cls"]))
                for key, fields in iter_samples(f, str(path))]


def test_regular_path_equals_member_walk(tmp_path):
    w = ShardSetWriter(tmp_path, "ds", "train", "student", 10)
    labels = [0, 7, 123, 45, 9, 1000, 3, 0, 12, 5]
    for i, label in enumerate(labels):
        w.write(f"{i:06d}_{'x' * i}", np.full((3, 4), i * 0.5), {"cls": label, "json": {"i": i}})
    (e,) = w.close()
    buf = np.frombuffer(bytearray((tmp_path / e.name).read_bytes()), np.uint8)
    fast = read_regular(buf, 10, "student.mp", (3, 4), np.dtype("<f2"), True)
    assert fast is not None  # what the writer makes is regular
    data = read_shard(str(tmp_path / e.name), e, model_entry([e]), labels=True)
    walked = walk(tmp_path / e.name)
    assert fast[0] == data.keys == [k for k, _, _ in walked]
    assert fast[2].tolist() == data.labels.tolist() == [c for _, _, c in walked] == labels
    np.testing.assert_array_equal(data.features, np.stack([f for _, f, _ in walked]))


def test_irregular_shard_falls_back_to_the_walk(tmp_path):
    w = ShardSetWriter(tmp_path, "ds", "train", "student", 4)
    for i in range(4):  # sample 2's json needs two tar blocks
        path = "x" * (600 if i == 2 else 1)
        w.write(f"k{i}", np.full((3, 4), i), {"cls": i, "json": {"p": path}})
    (e,) = w.close()
    buf = np.frombuffer(bytearray((tmp_path / e.name).read_bytes()), np.uint8)
    assert read_regular(buf, 4, "student.mp", (3, 4), np.dtype("<f2"), True) is None
    data = read_shard(str(tmp_path / e.name), e, model_entry([e]), labels=True)
    assert data.keys == ["k0", "k1", "k2", "k3"] and data.labels.tolist() == [0, 1, 2, 3]
    assert data.features[:, 0, 0].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("offset, data, message", [
    (3 * 3072 + 2048 + 10, b"Z", "checksum"),          # sample 3's .mp header name
    (3 * 3072 + 2560 + 22, b"\x05", "needs"),           # sample 3's shape: [3, 5]
    (3 * 3072 + 2560 + 1, b"\xa6", "msgpack"),          # sample 3's map key length
])
def test_damage_after_the_first_sample_is_found(tmp_path, offset, data, message):
    (e,) = write_set(tmp_path, n=5, shard_size=5)
    corrupt(tmp_path / e.name, offset, data)
    with pytest.raises(ShardError, match=message) as info:
        read_shard(str(tmp_path / e.name), e, model_entry([e]), labels=True)
    assert info.value.sample == "000003_v3"


def test_more_samples_than_the_manifest_lists(tmp_path):
    (e,) = write_set(tmp_path, n=3, shard_size=3)
    fewer = type(e)(e.name, 2, e.bytes, e.sha256)
    with pytest.raises(ShardError, match="more than the 2 samples"):
        read_shard(str(tmp_path / e.name), fewer, model_entry([fewer]), labels=True)


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads http through curl")
def test_read_over_http(tmp_path):
    import functools
    import http.server
    import threading

    entries = write_set(tmp_path, n=3, shard_size=3)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{entries[0].name}"
        data = read_shard(url, entries[0], model_entry(entries), labels=True)
        assert data.keys == ["000000_v0", "000001_v1", "000002_v2"]
    finally:
        server.shutdown()


# ---- sizes a stranger's manifest may ask for -----------------------------------------------------

@pytest.mark.parametrize("mapped", [False, True])
def test_local_shard_size_is_checked_before_allocating(tmp_path, mapped):
    (e,) = write_set(tmp_path, n=3, shard_size=3)
    path = str(tmp_path / e.name)
    huge = type(e)(e.name, 3, 60 << 30, e.sha256)  # would be a 60 GiB buffer (or mapping)
    with pytest.raises(ShardError, match=rf"{e.bytes} bytes on disk, the manifest lists "
                                         rf"{60 << 30} \(truncated\?\)") as info:
        read_shard(path, huge, model_entry([huge]), labels=True, mapped=mapped)
    assert info.value.shard == path
    small = type(e)(e.name, 3, e.bytes - 512, e.sha256)
    with pytest.raises(ShardError, match=f"{e.bytes} bytes on disk, the manifest lists "
                                         f"{e.bytes - 512};"):
        read_shard(f"file:{path}", small, model_entry([small]), labels=True, mapped=mapped)


def test_a_mapped_shard_is_the_read_one_and_read_only(tmp_path):
    """``mapped``: the same arrays as a read, viewing the file's mapping (no copy), and rows
    read from the file into a batch are the same bytes."""
    (e,) = write_set(tmp_path, n=8, shard_size=8, shape=(600, 1200))  # 11.5 MB
    path, model = tmp_path / e.name, model_entry([e], shape=(600, 1200))
    read = read_shard(path, e, model, labels=True)
    mapped = read_shard(path, e, model, labels=True, mapped=True)
    assert read.file is None and on_a_mapping(mapped.file.view)
    assert np.shares_memory(mapped.features, mapped.file.view)  # a view of the file, no copy
    assert mapped.keys == read.keys and (mapped.labels == read.labels).all()
    np.testing.assert_array_equal(mapped.features, read.features)
    out = np.zeros((8, 600, 1200), np.float16)
    for i in (7, 0, 3):
        mapped.copy_row(i, out[i])
        np.testing.assert_array_equal(out[i], read.features[i])


TRUNCATE_WHILE_OPEN = """
import os, sys
import numpy as np
from bombkd_io.errors import ShardError
from bombkd_io.shards.reader import read_shard
from bombkd_io.shards.manifest import ModelEntry, ShardEntry
path, size = sys.argv[1], os.path.getsize(sys.argv[1])
entry = ShardEntry(os.path.basename(path), 8, size, "0" * 64)
model = ModelEntry("student", "tiny", 1200, 600, 4, 32, "time", "float16", [entry])
data = read_shard(path, entry, model, labels=True, mapped=True)
os.truncate(path, size // 2)  # rewritten in place by someone else, while it is open
try:
    data.copy_row(7, np.empty((600, 1200), np.float16))
except ShardError as exc:
    print(exc)
"""


def test_a_shard_truncated_while_open_is_an_error_not_a_fault(tmp_path):
    """Rows are read, never touched through the mapping: a shard cut short in place after it
    was opened gives a ShardError naming it (reading the mapping past the end would kill the
    process with SIGBUS; a child process, so that such a regression cannot take pytest down)."""
    (e,) = write_set(tmp_path, n=8, shard_size=8, shape=(600, 1200))
    path = tmp_path / e.name
    run = subprocess.run([sys.executable, "-c", TRUNCATE_WHILE_OPEN, str(path)],
                         capture_output=True, text=True, env=child_env(), timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"{path}: became shorter while being read" in run.stdout


@pytest.mark.parametrize("mapped", [False, True])
@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_shard_that_is_not_a_regular_file_is_refused(tmp_path, mapped, kind):
    """A FIFO would block the open forever, a directory cannot be read: both are refused,
    naming the shard, before anything is opened (in a thread, so a regression cannot hang)."""
    (e,) = write_set(tmp_path, n=3, shard_size=3)
    path = tmp_path / e.name
    path.unlink()
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    listed = type(e)(e.name, 3, path.stat().st_size, e.sha256)  # the size matches
    errors = []

    def read():
        try:
            read_shard(str(path), listed, model_entry([listed]), labels=True, mapped=mapped)
        except ShardError as exc:
            errors.append(exc)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "read_shard blocked"
    assert len(errors) == 1 and f"{path}: is not a regular file" in str(errors[0])


def test_a_cold_mapping_is_read_into_the_page_cache_first(tmp_path):
    """Every page of a shard dropped from the page cache is read in before the gather."""
    (e,) = write_set(tmp_path, n=8, shard_size=8, shape=(600, 1200))
    path = tmp_path / e.name
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # clean pages (written above) can be dropped
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        view = np.frombuffer(mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ), np.uint8)
        if _resident(view).all():
            pytest.skip(f"the file system of {tmp_path} keeps files in memory (tmpfs?)")
        _make_resident(str(path), f.fileno(), view)
        assert _resident(view).all()


def test_stream_larger_than_listed_is_refused(tmp_path):
    (e,) = write_set(tmp_path, n=3, shard_size=3, shape=(300, 1200))  # ~2.2 MB shard
    small = type(e)(e.name, 3, e.bytes // 2, e.sha256)
    url = f"pipe:cat {tmp_path / e.name}"
    with pytest.raises(ShardError, match="larger than the manifest lists") as info:
        read_shard(url, small, model_entry([small], shape=(300, 1200)), labels=True)
    assert info.value.shard == url


@pytest.mark.parametrize("change, message", [
    (lambda d: d["models"]["student"]["shards"][0].update(bytes=1 << 40), "outside \\[0, "),
    (lambda d: d["models"]["student"]["shards"][0].update(bytes=-1), "outside \\[0, "),
    (lambda d: d["models"]["videomae"].update(dim=1 << 40), "over the limit"),
    (lambda d: d["models"]["videomae"].update(tokens=0), "must be positive"),
    (lambda d: d.update(shard_size=1 << 30), "shard_size must be in"),
])
def test_manifest_bounds_sizes(tmp_path, change, message):
    root = copy_golden(tmp_path)
    path = root / "golden-train.index.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(FormatError, match=message) as info:
        load_manifest(root, "train")
    assert str(path) in str(info.value)


def test_on_error_is_checked_once_with_the_argument_name():
    with pytest.raises(ConfigError, match=r"on_error must be one of .*, got 'warn'"):
        ErrorPolicy("warn")
    with pytest.raises(ConfigError, match="--on-error must be one of"):
        ErrorPolicy("ignore", "--on-error")


def test_model_entry_records_where_features_came_from():
    """The optional fields round-trip; a manifest without them (the golden one) reads as None,
    writes none of them, and contradicts nothing it did not record."""
    old = load_manifest(GOLDEN, "train").models["student"]
    assert old.weights is None and set(old.to_json()).isdisjoint(
        ["source", "revision", "weights", "model_dtype", "mean", "std", "bombkd"])
    assert old.contradictions(weights="commit:abc", revision="v2") == {}
    e = replace(old, source="/models/student", revision="v1", weights="files-sha256:00ff",
                model_dtype="float32", mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25],
                bombkd="0.1.0")
    data = json.loads(json.dumps(e.to_json()))
    assert data["weights"] == "files-sha256:00ff" and data["mean"] == [0.5, 0.5, 0.5]
    assert ModelEntry.from_json("student", data, e.shards) == e
    assert e.contradictions(revision="v2", mean=[0.5, 0.5, 0.5]) == {"revision": ("v1", "v2")}
    with pytest.raises(TypeError, match="a list of 3 numbers"):
        ModelEntry.from_json("student", {**data, "std": [1, 2]})
    with pytest.raises(TypeError, match="expected a string"):
        ModelEntry.from_json("student", {**data, "weights": 7})
