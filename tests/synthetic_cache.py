"""Small synthetic feature caches (real shards, real manifest) for the trainer tests.

Student features are a class pattern plus noise; each teacher's features are a fixed linear map
of the student's, resampled to the teacher's token count, so converters can be fitted exactly
and the fusion head can learn the classes in a few steps.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bombkd_io.shards.manifest import Manifest, ModelEntry, save_manifest
from bombkd_io.shards.writer import ShardSetWriter
from bombkd_train.converters import resample_tokens

STUDENT = dict(backbone="tiny-student", dim=16, tokens=4)
TEACHERS = {"ta": dict(dim=24, tokens=2), "tb": dict(dim=8, tokens=8)}


def make_feature_cache(root: str | Path, *, split: str = "train", count: int = 48, classes: int = 4,
                       shard_size: int = 16, dtype: str = "float32", seed: int = 0,
                       student: str = STUDENT["backbone"], dataset: str = "synth",
                       teachers: dict = TEACHERS) -> Path:
    """Write a format-1 cache of ``count`` samples under ``root`` (student and ``teachers``, a
    subset of ``TEACHERS``); returns ``root``."""
    rng = np.random.default_rng(seed)
    patterns = np.random.default_rng(123).normal(size=(classes, STUDENT["tokens"], STUDENT["dim"]))
    labels = np.arange(count) % classes
    stu = patterns[labels] + 0.8 * rng.normal(size=(count, STUDENT["tokens"], STUDENT["dim"]))
    maps = {t: np.random.default_rng(7 + i).normal(size=(STUDENT["dim"], spec["dim"])) / 4
            for i, (t, spec) in enumerate(TEACHERS.items())}
    models = {"student": (student, stu.astype(np.float32), STUDENT)}
    for t, spec in teachers.items():
        feats = resample_tokens(torch.from_numpy(stu).float(), spec["tokens"]).numpy() @ maps[t]
        models[t] = (f"tiny-{t}", feats.astype(np.float32), spec)
    entries = {}
    for role, (backbone, feats, spec) in models.items():
        with ShardSetWriter(root, dataset, split, role, shard_size, dtype) as writer:
            for i in range(count):
                extra = ({"cls": int(labels[i]), "json": {"path": f"v{i}.webm", "class_name": f"c{labels[i]}",
                                                         "frame_indices": [0], "fps": 25.0}}
                         if role == "student" else None)
                writer.write(f"{i:06d}_v{i}", feats[i], extra)
        entries[role] = ModelEntry(role, backbone, spec["dim"], spec["tokens"], 16, 32, "time", dtype,
                                   writer.entries)
    save_manifest(Manifest(dataset, split, [f"c{c}" for c in range(classes)], shard_size, entries,
                           count), root)
    return Path(root)
