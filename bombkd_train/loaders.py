"""The one switch between the two ways of feeding the trainer.

``open_source(cfg, split)`` returns a loader and what the trainer needs to know about its data;
``--loader wds`` streams the student shard set of a feature cache, ``--loader dali`` decodes the
videos and runs the student. Both loaders yield the same batch dict in the same order:

    {"student": float32 [B, T', D], "label": int64 [B], "key": list[str], "index": int64 [B]}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bombkd_io.errors import ConfigError
from bombkd_io.sampling import DEFAULT_SHARD_SIZE

LOADERS = ("dali", "wds")


@dataclass
class DataConfig:
    """Where the features come from. ``None`` means: what the cache records, else the default."""

    loader: str                   # "wds" (cached features) | "dali" (videos)
    root: str                     # wds: the feature cache; dali: the dataset root
    dataset: str | None = None    # dali: required; wds: picks one of several caches in root
    student: str | None = None    # dali: required; wds: checked against the cache's student
    frames: int | None = None     # dali: default 16 (or the cache's)
    size: int | None = None       # dali: default the backbone's (or the cache's)
    pool: str | None = None       # dali: default "time" (or the cache's)
    batch: int = 8
    workers: int = 0
    seed: int = 0
    shard_size: int | None = None  # dali: default the cache's, else DEFAULT_SHARD_SIZE
    cache: str | None = None       # dali: a feature cache whose plan and student settings to replay
    device: str = "cpu"
    on_error: str = "raise"        # wds: a corrupt shard stops the run ("raise") or is skipped

    def problems(self) -> list[str]:
        out = []
        if self.loader not in LOADERS:
            out.append(f"--loader {self.loader!r}: expected one of {LOADERS}")
        if self.loader == "dali" and not self.dataset:
            out.append("--dataset: required with --loader dali "
                       "(ucf101, hmdb51, folder, csv, jsonl)")
        if self.loader == "dali" and not self.student:
            out.append("--student: required with --loader dali")
        if self.on_error not in ("raise", "skip"):
            out.append(f"--on-error {self.on_error!r}: expected raise or skip")
        if self.batch < 1:
            out.append(f"--batch {self.batch}: must be >= 1")
        if self.workers < 0:
            out.append(f"--workers {self.workers}: must be >= 0")
        for arg, value in (("--shard-size", self.shard_size), ("--frames", self.frames),
                           ("--size", self.size)):
            if value is not None and value < 1:
                out.append(f"{arg} {value}: must be >= 1")
        return out


@dataclass
class StudentInfo:
    backbone: str   # registry / hub name
    dim: int
    tokens: int
    frames: int
    size: int
    pool: str


@dataclass
class FeatureSource:
    loader: Any                       # set_epoch(e), num_batches(e), iter -> batch dicts
    classes: list[str]                # id -> name
    num_samples: int
    student: StudentInfo
    failed: list = field(default_factory=list)   # videos left out, with the reason


def open_source(cfg: DataConfig, split: str, *, rank: int = 0,
                world_size: int = 1) -> FeatureSource:
    """A loader for ``split`` and what it feeds; raises ``ConfigError`` before any training."""
    problems = cfg.problems()
    if problems:
        raise ConfigError(problems)
    if cfg.loader == "wds":
        return _cached(cfg, split, rank, world_size)
    return _video(cfg, split, rank, world_size)


def _cached(cfg: DataConfig, split: str, rank: int, world_size: int) -> FeatureSource:
    from bombkd_io.loader import make_cached_loader

    loader = make_cached_loader(cfg.root, split, models=("student",), batch_size=cfg.batch,
                                seed=cfg.seed, num_workers=cfg.workers, rank=rank,
                                world_size=world_size, dataset=cfg.dataset,
                                on_error=cfg.on_error)
    manifest = loader.manifest
    entry = manifest.models["student"]
    problems = []
    if cfg.student and cfg.student != entry.backbone:
        problems.append(f"--student {cfg.student}: the cache at {cfg.root} was built with student "
                        f"{entry.backbone!r}; pass --student {entry.backbone} or featurize again")
    for arg, want, have in (("--frames", cfg.frames, entry.frames),
                            ("--size", cfg.size, entry.size), ("--pool", cfg.pool, entry.pooling)):
        if want is not None and want != have:
            problems.append(f"{arg} {want}: the cache at {cfg.root} holds features of {arg[2:]}="
                            f"{have}; drop {arg} or featurize again")
    if problems:
        raise ConfigError(problems)
    return FeatureSource(loader=loader, classes=list(manifest.classes), num_samples=manifest.count,
                         student=StudentInfo(entry.backbone, entry.dim, entry.tokens, entry.frames,
                                             entry.size, entry.pooling),
                         failed=list(manifest.failed))


def _replayed(cfg: DataConfig, split: str) -> tuple[int, int, int | None, str, set[str]]:
    """Shard size, frames, size, pooling and the videos to leave out, for video mode: the
    cache's when one is given (its failed videos include any that probed but did not decode)."""
    shard_size, frames, size, pool, failed = cfg.shard_size, cfg.frames, cfg.size, cfg.pool, set()
    if cfg.cache:
        from bombkd_io.shards.manifest import load_manifest

        manifest = load_manifest(cfg.cache, split, dataset=cfg.dataset)
        entry = manifest.models["student"]
        problems = [f"{arg} {want}: the cache at {cfg.cache} used {have}; drop {arg}"
                    for arg, want, have in (("--shard-size", shard_size, manifest.shard_size),
                                            ("--frames", frames, entry.frames),
                                            ("--size", size, entry.size),
                                            ("--pool", pool, entry.pooling))
                    if want is not None and want != have]
        if cfg.student != entry.backbone:
            problems.append(f"--student {cfg.student}: the cache at {cfg.cache} was built with "
                            f"student {entry.backbone!r}")
        if problems:
            raise ConfigError(problems)
        shard_size, frames, size = manifest.shard_size, entry.frames, entry.size
        pool = entry.pooling
        failed = {f["path"] for f in manifest.failed}
    return shard_size or DEFAULT_SHARD_SIZE, frames or 16, size, pool or "time", failed


def _video(cfg: DataConfig, split: str, rank: int, world_size: int) -> FeatureSource:
    from bombkd_train.video_loader import VideoFeatureLoader

    shard_size, frames, size, pool, exclude = _replayed(cfg, split)
    loader = VideoFeatureLoader(cfg.dataset, cfg.root, split, student=cfg.student, frames=frames,
                                size=size, pool=pool, batch_size=cfg.batch, seed=cfg.seed,
                                shard_size=shard_size, num_workers=cfg.workers, rank=rank,
                                world_size=world_size, device=cfg.device, exclude=exclude)
    bb = loader.backbone
    return FeatureSource(loader=loader, classes=loader.classes, num_samples=loader.num_samples,
                         student=StudentInfo(cfg.student, bb.dim, bb.tokens, bb.frames, bb.size,
                                             bb.pool),
                         failed=[{"path": p, "reason": r} for p, r in loader.failed])
