"""TC-BombKD caches (synthetic, in the layouts its featurize writes) -> format 1."""
from __future__ import annotations

import gc
import json
import pickle
import tracemalloc
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bombkd_io.errors import ConfigError, DatasetError, FormatError
from bombkd_io.shards.import_tc import import_tc_cache
from bombkd_io.loaders.cached import make_cached_loader
from bombkd_io.shards.verify import verify_cache
from bombkd_train.cli.main import app

TEACHERS = ("videomae", "timesformer")


def record(i: int, *, label: int | None = None, style: str = "flat") -> dict:
    """A record as TC-BombKD's featurize writes it (fp16 numpy, teachers as flat keys)."""
    rec = {"path": f"/data/hmdb51/{['jump', 'run'][i % 2]}/clip {i}.avi",
           "label": i % 2 if label is None else label,
           "student": np.full((4, 8), i, np.float16)}
    teachers = {t: np.full((2, 6), -i - k, np.float16) for k, t in enumerate(TEACHERS)}
    if style == "flat":
        rec.update(teachers)
    else:  # the tolerated variants
        rec["feats"] = rec.pop("student")
        rec["teachers"] = teachers
    return rec


def write_sharded(root: Path, n=7, shard_size=3, **kw) -> Path:
    """features_hmdb51_train.index.json + features_hmdb51_train_shard_XXXXX.pkl"""
    root.mkdir(parents=True, exist_ok=True)
    index = {"dataset": "hmdb51", "split": "train", "student": "vjepa2",
             "teachers": list(TEACHERS), "dtype": "float16", "num_frames": 16,
             "shard_size": shard_size, "num_samples": n, "shards": []}
    for k, start in enumerate(range(0, n, shard_size)):
        name = f"features_hmdb51_train_shard_{k:05d}.pkl"
        recs = [record(i, **kw) for i in range(start, min(n, start + shard_size))]
        (root / name).write_bytes(pickle.dumps(recs))
        index["shards"].append({"file": name, "start": start, "count": len(recs)})
    index["shards"].reverse()  # order comes from "start", not list order
    path = root / "features_hmdb51_train.index.json"
    path.write_text(json.dumps(index))
    return path


def check_cache(out: Path, n: int, *, split="train") -> None:
    loader = make_cached_loader(out, split, models=("student", *TEACHERS), batch_size=4,
                                num_workers=0)
    seen = 0
    for b in loader:
        idx = b["index"].numpy()
        assert (b["student"][:, 0, 0].numpy() == idx).all()
        assert (b["timesformer"][:, 0, 0].numpy() == -idx - 1).all()
        assert (b["label"].numpy() == idx % 2).all()
        assert all(k.startswith(f"{i:06d}_clip_") for k, i in zip(b["key"], idx))
        seen += len(idx)
    assert seen == n


def test_sharded_index_round_trip(tmp_path):
    src = write_sharded(tmp_path / "tc")
    m = import_tc_cache(src.parent, tmp_path / "out", trust_pickle=True, shard_size=2)
    assert (m.dataset, m.split, m.count, m.shard_size) == ("hmdb51", "train", 7, 2)
    assert m.classes == ["jump", "run"] and m.labels
    assert list(m.models) == ["student", *sorted(TEACHERS)]
    s = m.models["student"]
    assert (s.backbone, s.tokens, s.dim, s.dtype, s.frames) == ("vjepa2", 4, 8, "float16", 16)
    assert m.models["videomae"].tokens == 2 and len(s.shards) == 4
    assert verify_cache(tmp_path / "out", m, progress=False) == []
    check_cache(tmp_path / "out", 7)


def test_pickle_needs_trust(tmp_path):
    src = write_sharded(tmp_path / "tc")
    with pytest.raises(ConfigError, match="arbitrary code.*--trust-pickle"):
        import_tc_cache(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before any I/O


def test_single_pkl_with_teacher_dict_and_feats(tmp_path):
    src = tmp_path / "features_ucf101_test.pkl"
    records = [record(i, style="dict") for i in range(5)]
    for r in records:  # extra non-feature fields are not taken for teachers
        r["frame_indices"] = np.arange(16)
    records[1]["feats"] = torch.from_numpy(records[1]["feats"])  # tensors in a pickle: fine
    src.write_bytes(pickle.dumps(records))
    m = import_tc_cache(src, tmp_path / "out", trust_pickle=True, shard_size=2)
    assert (m.dataset, m.split, m.count) == ("ucf101", "test", 5)
    assert m.models["student"].backbone == "unknown"
    check_cache(tmp_path / "out", 5, split="test")


def test_npy_dir_needs_no_pickle(tmp_path):
    src = tmp_path / "npy"
    src.mkdir()
    n = 5
    np.save(src / "student.npy", np.stack([np.full((4, 8), i, np.float16) for i in range(n)]))
    for k, t in enumerate(TEACHERS):
        np.save(src / f"{t}.npy", np.stack([np.full((2, 6), -i - k, np.float16)
                                            for i in range(n)]))
    np.save(src / "labels.npy", np.arange(n) % 2)
    (src / "paths.json").write_text(json.dumps([f"/v/clip {i}.avi" for i in range(n)]))
    m = import_tc_cache(src, tmp_path / "out", dataset="toy", split="val")
    assert m.count == n and m.classes == ["class_0", "class_1"]
    check_cache(tmp_path / "out", n, split="val")


def test_npz_per_sample_dir(tmp_path):
    """The older TC-BombKD layout: one .npz per video with z0, t_<teacher>, label."""
    src = tmp_path / "npz"
    src.mkdir()
    for i in range(3):
        np.savez(src / f"clip {i}.npz", z0=np.full((4, 8), i, np.float32),
                 t_videomae=np.full((2, 6), -i, np.float32),
                 t_timesformer=np.full((2, 6), -i - 1, np.float32),
                 label=np.array([i % 2]), meta_json=np.frombuffer(b"{}", np.uint8))
    m = import_tc_cache(src, tmp_path / "out", dataset="toy", split="train")
    assert m.models["student"].dtype == "float32" and set(m.models) == {"student", *TEACHERS}
    check_cache(tmp_path / "out", 3)


def test_unlabelled_cache_is_refused_by_the_loader(tmp_path):
    src = write_sharded(tmp_path / "tc", n=3, label=-1)
    m = import_tc_cache(src, tmp_path / "out", trust_pickle=True)
    assert not m.labels
    with pytest.raises(DatasetError, match="has no labels in this cache, so it can be featurized but not trained"):
        make_cached_loader(tmp_path / "out", "train")


def test_bad_inputs(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        import_tc_cache(tmp_path / "missing", tmp_path / "out")
    src = write_sharded(tmp_path / "tc", n=3)
    recs = [record(0), {k: v for k, v in record(1).items() if k != "vivit" and k != "videomae"}]
    (tmp_path / "tc" / "features_hmdb51_train_shard_00000.pkl").write_bytes(pickle.dumps(recs))
    with pytest.raises(FormatError, match=r"shard_00000.pkl record 1: teachers \['timesformer'\]"):
        import_tc_cache(src, tmp_path / "out", trust_pickle=True)
    assert not list((tmp_path / "out").glob("*.tar*"))  # nothing half-written kept as a shard
    (tmp_path / "tc" / "features_hmdb51_train_shard_00000.pkl").write_bytes(
        pickle.dumps([{"label": 1}]))
    with pytest.raises(FormatError, match="no student features"):
        import_tc_cache(src, tmp_path / "out2", trust_pickle=True)
    bad = tmp_path / "features_x_train.index.json"
    bad.write_text(json.dumps({"shards": []}))
    with pytest.raises(FormatError, match="not a TC-BombKD index"):
        import_tc_cache(bad, tmp_path / "out3", trust_pickle=True)


# ---- current TC-BombKD: sharded index, storage "npy_dir" (default) or "pkl" ----------------------

def write_tc(root: Path, storage: str, n=7, shard_size=3, teachers=TEACHERS, odd=None) -> Path:
    """A sharded cache as current TC-BombKD writes it: the index names each shard without a
    suffix; "pkl": the file NAME.pkl, "npy_dir": the directory NAME with, per model,
    {name}_concat.npy (every sample's rows) + {name}_offs.npy (N+1 offsets), labels.npy,
    paths.npy. ``odd``: the record whose student features have one token more."""
    root.mkdir(parents=True, exist_ok=True)
    index = {"dataset": "hmdb51", "split": "train", "student": "vjepa2", "teachers": list(teachers),
             "dtype": "float16", "num_frames": 16, "frames_student": 16,
             "frames_teachers": {t: 8 for t in teachers}, "shard_size": shard_size,
             "storage": storage, "num_samples": n, "shards": []}
    for k, start in enumerate(range(0, n, shard_size)):
        name = f"features_hmdb51_train_shard_{k:05d}"
        recs = [record(i) for i in range(start, min(n, start + shard_size))]
        for i, rec in zip(range(start, n), recs):
            rec.update({t: rec.pop(plain) for t, plain in zip(teachers, TEACHERS)})
            if i == odd:
                rec["student"] = np.full((5, 8), i, np.float16)
        if storage == "pkl":
            (root / f"{name}.pkl").write_bytes(pickle.dumps(recs))
        else:
            write_ragged(root / name, recs, teachers)
        index["shards"].append({"file": name, "start": start, "count": len(recs)})
    path = root / "features_hmdb51_train.index.json"
    path.write_text(json.dumps(index))
    return path


def write_ragged(folder: Path, recs: list[dict], teachers=TEACHERS) -> Path:
    folder.mkdir()
    for model in ("student", *teachers):
        feats = [r[model] for r in recs]
        offs = np.concatenate([[0], np.cumsum([len(f) for f in feats])]).astype(np.int64)
        stem = model.replace("/", "_")
        np.save(folder / f"{stem}_concat.npy", np.concatenate(feats))  # [sum T_i, D]
        np.save(folder / f"{stem}_offs.npy", offs)                     # [N+1]
    np.save(folder / "labels.npy", np.array([r["label"] for r in recs], np.int64))
    np.save(folder / "paths.npy", np.array([r["path"] for r in recs], np.str_))
    return folder


@pytest.mark.parametrize("storage", ["npy_dir", "pkl"])
def test_current_tc_index_round_trip(tmp_path, storage):
    src = write_tc(tmp_path / "tc", storage)
    m = import_tc_cache(src.parent, tmp_path / "out", trust_pickle=storage == "pkl",
                        shard_size=2)
    assert (m.dataset, m.split, m.count, m.classes) == ("hmdb51", "train", 7, ["jump", "run"])
    assert list(m.models) == ["student", *sorted(TEACHERS)]
    assert [(e.tokens, e.dim, e.frames) for e in m.models.values()] == [(4, 8, 16), (2, 6, 8),
                                                                        (2, 6, 8)]
    assert verify_cache(tmp_path / "out", m, progress=False) == []
    check_cache(tmp_path / "out", 7)


def test_npy_dir_needs_no_trust_and_takes_hub_teacher_names(tmp_path):
    hub = ("MCG-NJU/videomae", "facebook/timesformer")
    src = write_tc(tmp_path / "tc", "npy_dir", teachers=hub)
    assert (tmp_path / "tc" / "features_hmdb51_train_shard_00000" /
            "MCG-NJU_videomae_concat.npy").is_file()
    m = import_tc_cache(src, tmp_path / "out")
    assert {r: e.backbone for r, e in m.models.items()} == {
        "student": "vjepa2", "videomae": "MCG-NJU/videomae", "timesformer": "facebook/timesformer"}
    check_cache(tmp_path / "out", 7)


def test_one_ragged_shard_as_src(tmp_path):
    """No index: the teachers are the shard's other *_concat.npy files."""
    write_tc(tmp_path / "tc", "npy_dir")
    m = import_tc_cache(tmp_path / "tc" / "features_hmdb51_train_shard_00001", tmp_path / "out",
                        dataset="hmdb51", split="train")
    assert m.count == 3 and set(m.models) == {"student", *TEACHERS}


@pytest.mark.parametrize("storage", ["npy_dir", "pkl"])
def test_varying_token_counts_are_refused(tmp_path, storage):
    src = write_tc(tmp_path / "tc", storage, odd=4)
    with pytest.raises(FormatError, match=r"shard_00001(\.pkl)? record 1 \(/data/hmdb51/jump/"
                       r"clip 4.avi\): student features \[5, 8\], but the first sample's are "
                       r"\[4, 8\]; .*token counts differ"):
        import_tc_cache(src, tmp_path / "out", trust_pickle=True, shard_size=2)
    # two output shards were finished before record 4: a failed import keeps none
    assert list((tmp_path / "out").iterdir()) == []


def test_cli_imports_with_quiet(tmp_path):
    src = write_tc(tmp_path / "tc", "npy_dir")
    result = CliRunner().invoke(app, ["import-cache", str(src), "--out", str(tmp_path / "out"),
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    assert "hmdb51-train" in result.output and "sample" not in result.stderr


# ---- hostile TC-BombKD npy_dir shards and indexes: a FormatError naming the file, nothing kept ---

def resave(name: str, change):
    """A corruption: ``change(array)`` of shard 0's ``name`` saved back in its place."""
    def corrupt(shard: Path) -> None:
        np.save(shard / name, change(np.load(shard / name)))
    return corrupt


def append_bytes(name: str, data: bytes):
    def corrupt(shard: Path) -> None:
        with open(shard / name, "ab") as f:
            f.write(data)
    return corrupt


def truncate(name: str, keep: int):
    def corrupt(shard: Path) -> None:
        (shard / name).write_bytes((shard / name).read_bytes()[:keep])
    return corrupt


def claim_shape(name: str, shape: tuple):
    """Rewrite the header to claim ``shape``, keeping the data bytes as they are."""
    def corrupt(shard: Path) -> None:
        array = np.load(shard / name)
        header = np.lib.format.header_data_from_array_1_0(array)
        header["shape"] = shape
        with open(shard / name, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            f.write(array.tobytes())
    return corrupt


def decreasing(offs):
    offs[2] = offs[1] - 1
    return offs


@pytest.mark.parametrize("corrupt, why", [
    (resave("student_offs.npy", decreasing), r"student_offs.npy: offs\[2\] = 3 is below offs\[1\]"),
    (resave("student_offs.npy", lambda o: o + 1), r"offs\[0\] is 1, not 0"),
    (resave("videomae_offs.npy", lambda o: o * 2), r"videomae_offs.npy: the last offset is 12, "
                                                   r"not the 6 rows"),
    (resave("student_offs.npy", lambda o: o.astype(np.float64)), "expected integer offsets"),
    (resave("student_concat.npy", lambda c: c[None]), r"expected float rows .*float16\[1, 12, 8"),
    (resave("labels.npy", lambda x: x[:2]), r"samples per file \{.*'labels.npy': 2"),
    (resave("timesformer_offs.npy", lambda o: o[:3]), "the last offset is 4, not the 6 rows"),
    (resave("paths.npy", lambda p: p.astype(object)), "holds Python objects"),
    (claim_shape("student_concat.npy", (10 ** 9, 8)), r"declares shape \[1000000000, 8\] "
                                                       r"float16 .* but holds 192 bytes"),
    (truncate("student_concat.npy", 200), "declares shape .* but holds 72 bytes"),
    (append_bytes("student_concat.npy", b"\0" * 16), "declares shape .* but holds 208 bytes"),
    (lambda shard: (shard / "videomae_concat.npy").unlink(), "videomae_concat.npy: missing"),
    (lambda shard: (shard / "labels.npy").write_bytes(pickle.dumps([0, 1, 0])),
     r"labels.npy: not an .npy file"),
])
def test_hostile_npy_dir_shard(tmp_path, corrupt, why):
    src = write_tc(tmp_path / "tc", "npy_dir")
    corrupt(tmp_path / "tc" / "features_hmdb51_train_shard_00000")
    with pytest.raises(FormatError, match=why):
        import_tc_cache(src, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*"))


@pytest.mark.parametrize("change, error, why", [
    ({"storage": "zarr"}, FormatError, r"storage 'zarr' is not one of \('npy_dir', 'pkl'\)"),
    ({"teachers": ["../../etc"]}, FormatError, r"teacher '.._.._etc' cannot name a file"),
    ({"teachers": ["videomae", "t_videomae"]}, FormatError, "each teacher needs its own role"),
    ({"teachers": "videomae"}, FormatError, "is not a list of names"),
    ({"num_frames": "16"}, FormatError, "num_frames '16' is not a frame count"),
    ({"frames_teachers": {"videomae": -1}}, FormatError, "frames_teachers .* is not a"),
    ({"shards": [{"file": "features_hmdb51_train_shard_00000", "start": 0, "count": 4}]},
     FormatError, r"lists count=4 for features_hmdb51_train_shard_00000, which holds 3"),
    ({"shards": [{"file": "features_hmdb51_train_shard_00000", "start": 0, "count": -3}]},
     FormatError, "not a TC-BombKD index .*count -3"),
    ({"storage": "pkl"}, DatasetError, r"do not exist: .*shard_00000.pkl.*NAME.pkl for 'pkl'"),
])
def test_hostile_index(tmp_path, change, error, why):
    src = write_tc(tmp_path / "tc", "npy_dir")
    src.write_text(json.dumps({**json.loads(src.read_text()), **change}))
    with pytest.raises(error, match=why):
        import_tc_cache(src, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*"))


@pytest.mark.parametrize("storage", ["npy_dir", "pkl"])
@pytest.mark.parametrize("name", ["../features_hmdb51_train_shard_00000", "/etc/passwd",
                                  "sub/shard", "..", "x\\y"])
def test_index_shard_names_are_plain(tmp_path, storage, name):
    src = write_tc(tmp_path / "tc", storage)
    index = json.loads(src.read_text())
    index["shards"][0]["file"] = name
    src.write_text(json.dumps(index))
    with pytest.raises(FormatError, match="may only name files beside it"):
        import_tc_cache(src, tmp_path / "out", trust_pickle=True)


def test_npy_dir_storage_names_directories(tmp_path):
    src = write_tc(tmp_path / "tc", "pkl")
    index = json.loads(src.read_text())
    index["shards"] = [{"file": "features_hmdb51_train_shard_00000.pkl", "start": 0, "count": 3}]
    src.write_text(json.dumps({**index, "storage": "npy_dir"}))
    with pytest.raises(FormatError, match="storage 'npy_dir', but .*shard_00000.pkl is not a "
                                          "directory"):
        import_tc_cache(src, tmp_path / "out", trust_pickle=True)


def test_cli_refuses_a_hostile_shard(tmp_path):
    src = write_tc(tmp_path / "tc", "npy_dir")
    resave("student_offs.npy", decreasing)(tmp_path / "tc" / "features_hmdb51_train_shard_00001")
    result = CliRunner().invoke(app, ["import-cache", str(src), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.startswith("error: ") and "shard_00001/student_offs.npy" in result.stderr
    assert list((tmp_path / "out").iterdir()) == []


# ---- memory: one source shard at a time ---------------------------------------------------------

def test_import_holds_one_source_shard_at_a_time(tmp_path, monkeypatch):
    """Structural: every array a shard's files give is gone (the mapping released) before the
    next shard's first file is opened; and what Python and numpy allocate stays well under one
    shard's bytes (the rows are memory-mapped, one sample copied out at a time)."""
    from bombkd_io.shards import tc_shards

    n, per = 160, 40
    recs = [{"path": f"/v/c{i}.avi", "label": i % 3, "student": np.full((16, 768), i, np.float16),
             **{t: np.full((16, 768), -i, np.float16) for t in TEACHERS}} for i in range(n)]
    index = {"storage": "npy_dir", "teachers": list(TEACHERS), "shards": []}
    (tmp_path / "tc").mkdir()
    for k in range(n // per):
        write_ragged(tmp_path / "tc" / f"s{k}", recs[k * per:(k + 1) * per])
        index["shards"].append({"file": f"s{k}", "start": k * per, "count": per})
    src = tmp_path / "tc" / "features_toy_train.index.json"
    src.write_text(json.dumps(index))
    shard_bytes = sum(f.stat().st_size for f in (tmp_path / "tc" / "s0").iterdir())
    del recs

    alive: dict[Path, list] = {}
    load_arrays = tc_shards.load_arrays

    def tracked(path):
        gc.collect()
        others = [p.name for p, refs in alive.items()
                  if p != path.parent and any(r() is not None for r in refs)]
        assert others == [], f"opening {path}: arrays of {others} still alive"
        arrays = load_arrays(path)
        alive.setdefault(path.parent, []).extend(weakref.ref(a) for a in arrays.values())
        return arrays

    monkeypatch.setattr(tc_shards, "load_arrays", tracked)
    tracemalloc.start()
    try:
        m = import_tc_cache(src, tmp_path / "out", shard_size=64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert m.count == n and sorted(p.name for p in alive) == ["s0", "s1", "s2", "s3"]
    assert peak < shard_bytes / 2, (peak, shard_bytes)  # a shard read whole: > shard_bytes
