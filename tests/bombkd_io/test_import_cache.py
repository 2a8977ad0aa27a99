"""TC-BombKD caches (synthetic, in the layouts its featurize writes) -> format 1."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from bombkd_io.errors import ConfigError, DatasetError, FormatError
from bombkd_io.shards.import_tc import import_tc_cache
from bombkd_io.loaders.cached import make_cached_loader
from bombkd_io.shards.verify import verify_cache

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
    with pytest.raises(DatasetError, match="Cached features do not contain labels"):
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
