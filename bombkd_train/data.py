"""The one switch between the two ways of feeding the trainer, and video mode's student step.

``open_source(cfg, split)`` (``DataConfig``) returns a loader and what the trainer needs to know
about its data: ``--loader wds`` streams the student shard set of a feature cache
(``bombkd_io.loaders.cached``); ``--loader dali`` takes the clip batches of
``bombkd_io.loaders.clips`` through the frozen student (``VideoFeatureLoader``). Both loaders
yield the same batch dict in the same order:

    {"student": float32 [B, T', D], "label": int64 [B], "key": list[str], "index": int64 [B]}

Video mode with ``--cache`` replays that cache's epoch plan, and warns when the cache's clips
were decoded another way than this run decodes them (``decoded_by``: parity then holds within
the GPU tolerance only).
"""
from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from bombkd_io.datasets import item_key
from bombkd_io.errors import ConfigError, DataWarning
from bombkd_io.loaders.clips import VideoClipLoader
from bombkd_io.sampling import DEFAULT_SHARD_SIZE
from bombkd_io.shards.manifest import manifest_sha256
from bombkd_io.video.route import parse_device
from bombkd_train.config import DataConfig, cache_contradictions
from bombkd_train.runtime import decode_threads_for, model_threads, parity_settings

# the argument that sets each field a cache records of its student and shards
CACHE_FLAGS = {"shard_size": "--shard-size", "frames": "--frames", "size": "--size",
               "pooling": "--pool", "revision": "--revision"}


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
    loader: Any          # set_epoch(e), num_batches(e), iter -> batch dicts, skipped, close()
    classes: list[str]   # id -> name
    num_samples: int
    shard_size: int      # of the epoch plan (the cache's, or the one video mode replays)
    student: StudentInfo
    failed: list = field(default_factory=list)   # videos left out, with the reason
    manifest_sha256: str | None = None  # of the cache read (wds) or replayed (dali --cache)

    def close(self) -> None:
        """Release the loader's decoders and threads (video mode); safe to call twice."""
        close = getattr(self.loader, "close", None)
        if close is not None:  # video decoders; the cached loader's persistent workers
            close()


def open_source(cfg: DataConfig, split: str, *, rank: int = 0,
                world_size: int = 1) -> FeatureSource:
    """A loader for ``split`` and what it feeds; raises ``ConfigError`` before any training."""
    cfg.validate()
    cfg = replace(cfg, device=parse_device(cfg.device))
    if cfg.loader == "wds":
        return _cached(cfg, split, rank, world_size)
    return _video(cfg, split, rank, world_size)


def _cached(cfg: DataConfig, split: str, rank: int, world_size: int) -> FeatureSource:
    from bombkd_io.loaders.cached import make_cached_loader
    from bombkd_io.shards.cache import parse_size

    limit = parse_size(cfg.shard_cache_limit) if cfg.shard_cache_limit is not None else None
    loader = make_cached_loader(cfg.root, split, models=("student",), batch_size=cfg.batch_size,
                                seed=cfg.seed, num_workers=cfg.loader_workers, rank=rank,
                                world_size=world_size, dataset=cfg.dataset,
                                on_error=cfg.on_error, shard_cache=cfg.shard_cache,
                                shard_cache_limit=limit)
    manifest = loader.manifest
    entry = manifest.models["student"]
    _check_cache(cfg, manifest, cfg.root)
    return FeatureSource(loader=loader, classes=list(manifest.classes), num_samples=manifest.count,
                         shard_size=manifest.shard_size,
                         student=StudentInfo(entry.backbone, entry.dim, entry.tokens, entry.frames,
                                             entry.size, entry.pooling),
                         failed=list(manifest.failed), manifest_sha256=manifest_sha256(manifest))


def _check_cache(cfg: DataConfig, manifest, where) -> None:
    """``ConfigError`` naming every argument that contradicts the cache at ``where`` (its
    manifest ``manifest``)."""
    found = cache_contradictions(manifest.models["student"], manifest.shard_size, cfg.shard_size,
                                 backbone=cfg.student or None, frames=cfg.frames, size=cfg.size,
                                 pooling=cfg.pooling, revision=cfg.revision)
    problems = []
    for key, (have, want) in found.items():
        if key == "backbone":
            problems.append(f"--student {want}: the cache at {where} was built with student "
                            f"{have!r}; pass --student {have} or featurize again")
        else:
            arg = CACHE_FLAGS[key]
            problems.append(f"{arg} {want}: the cache at {where} holds {arg[2:]}={have}; "
                            f"drop {arg} or featurize again")
    if problems:
        raise ConfigError(problems)


def _replayed(cfg: DataConfig, split: str) -> tuple[DataConfig, Any]:
    """Video mode's settings: the cache's shard size and student settings when ``--cache`` is
    given (with its manifest), else the arguments' or the defaults (and ``None``)."""
    manifest = None
    if cfg.cache:
        from bombkd_io.shards.manifest import load_manifest

        manifest = load_manifest(cfg.cache, split, dataset=cfg.dataset)
        _check_cache(cfg, manifest, cfg.cache)
        entry = manifest.models["student"]
        cfg = replace(cfg, shard_size=manifest.shard_size, frames=entry.frames, size=entry.size,
                      pooling=entry.pooling, revision=cfg.revision or entry.revision)
    return replace(cfg, shard_size=cfg.shard_size or DEFAULT_SHARD_SIZE, frames=cfg.frames or 16,
                   pooling=cfg.pooling or "time"), manifest


def _video(cfg: DataConfig, split: str, rank: int, world_size: int) -> FeatureSource:
    cfg, manifest = _replayed(cfg, split)
    # the cache's failed videos include any that probed but did not decode when featurized
    exclude = [f["path"] for f in manifest.failed] if manifest else []
    loader = VideoFeatureLoader(cfg.dataset, cfg.root, split, student=cfg.student,
                                frames=cfg.frames, size=cfg.size, pooling=cfg.pooling,
                                batch_size=cfg.batch_size, seed=cfg.seed,
                                shard_size=cfg.shard_size, rank=rank, world_size=world_size,
                                device=cfg.device, exclude=exclude, revision=cfg.revision)
    problems = (_index_mismatches(cfg, split, loader, manifest) +
                _weights_mismatch(cfg, loader.backbone, manifest)) if manifest else []
    if problems:
        loader.close()
        raise ConfigError(problems)
    if manifest:
        _warn_other_decoders(cfg, loader, manifest)
    bb = loader.backbone
    return FeatureSource(loader=loader, classes=loader.classes, num_samples=loader.num_samples,
                         shard_size=cfg.shard_size,
                         student=StudentInfo(cfg.student, bb.dim, bb.tokens, bb.frames, bb.size,
                                             bb.pool),
                         failed=[{"path": p, "reason": r} for p, r in loader.failed],
                         manifest_sha256=manifest_sha256(manifest) if manifest else None)


def _index_mismatches(cfg: DataConfig, split: str, loader, manifest) -> list[str]:
    """Why the videos under ``--root`` are not the samples of the ``--cache`` whose epoch plan
    video mode replays (sample i here must be sample i there)."""
    from bombkd_io.shards.manifest import manifest_path

    cache = manifest_path(cfg.cache, manifest.dataset, manifest.split)
    fix = (f"pass the --cache featurized from the videos in {cfg.root}, or featurize them "
           "again into a new cache")
    problems = [f"the cache {cache} left out {p}, which is not a {split} video in {cfg.root}"
                for p in loader.unmatched[:3]]
    if loader.classes != list(manifest.classes):
        problems.append(f"the {split} videos in {cfg.root} have classes {loader.classes}, the "
                        f"cache {cache} {list(manifest.classes)}")
    if loader.num_samples != manifest.count:
        problems.append(f"{loader.num_samples} {split} videos in {cfg.root} decode, the cache "
                        f"{cache} holds {manifest.count} samples")
    return problems + [fix] if problems else []


def _weights_mismatch(cfg: DataConfig, backbone, manifest) -> list[str]:
    """Why the student this run loaded is not the one the ``--cache`` was featurized with (its
    recorded ``weights``; a cache that recorded none is not compared)."""
    found = manifest.models["student"].contradictions(weights=backbone.weights)
    if not found:
        return []
    have, want = found["weights"]
    return [f"--student {cfg.student}: its weights are {want}, the cache {cfg.cache} was "
            f"featurized with {have}; load those weights (--revision, or the same folder), or "
            "featurize again"]


def _warn_other_decoders(cfg: DataConfig, loader, manifest) -> None:
    """One ``DataWarning`` when samples of the ``--cache`` were decoded by another route or
    device (their ``decoded_by``) than this run decodes them with: the GPU decoder converts
    colour its own way (DECODERS.md), so features then agree with the cache within the GPU
    tolerance, not exactly. Reads the student shards' ``.json`` members once; samples of a cache
    written before featurize recorded ``decoded_by`` are not compared."""
    from bombkd_io.names import locate
    from bombkd_io.shards.manifest import manifest_path
    from bombkd_io.shards.reader import read_meta
    from bombkd_io.video import decoder_of
    from bombkd_io.video.compare import GPU_TOLERANCE

    here = {item_key(i, loader.index.items[i]): decoder_of(info, loader.clips.caps)
            for i, info in zip(loader.positions, loader.infos)}
    differ = Counter()
    for shard in manifest.models["student"].shards:
        for key, doc in read_meta(locate(str(cfg.cache), shard.name)):
            there = doc.get("decoded_by")
            if there is not None and key in here and there != here[key]:
                differ[there, here[key]] += 1
    if differ:
        (there, ours), _ = differ.most_common(1)[0]
        cache = manifest_path(cfg.cache, manifest.dataset, manifest.split)
        mean, p99 = GPU_TOLERANCE
        warnings.warn(f"{sum(differ.values())} of the {manifest.count} samples of the cache "
                      f"{cache} were decoded by another route or device than this run uses "
                      f"(e.g. {there} there, {ours} here): features agree with the cache "
                      f"within the GPU tolerance (clips within mean {mean} / p99 {p99} levels), "
                      "not exactly; replay a cache featurized on this device for exact parity",
                      DataWarning, stacklevel=3)


class VideoFeatureLoader(VideoClipLoader):
    """Video mode's loader: the clip batches of ``VideoClipLoader`` through the frozen student,
    as the batch dict the cached loader yields, while the next batch decodes."""

    def __init__(self, dataset: str, root, split: str, *, student: str, frames: int = 16,
                 size: int | None = None, pooling: str = "time", batch_size: int = 8,
                 seed: int = 0, shard_size: int = DEFAULT_SHARD_SIZE, rank: int = 0,
                 world_size: int = 1, device: str = "cpu", decode_threads: int | None = None,
                 prefetch: int = 2, exclude: Collection[str] = (), revision: str | None = None):
        from bombkd_train.backbones import create_backbone  # pulls in DALI: video mode only

        super().__init__(dataset, root, split, batch_size=batch_size, seed=seed,
                         shard_size=shard_size, rank=rank, world_size=world_size,
                         device=device, exclude=exclude)
        self.backbone = create_backbone(student, frames=frames, size=size, pool=pooling,
                                        device=device, revision=revision)
        self.decode_threads = decode_threads or decode_threads_for()
        self.open(frames=self.backbone.frames, size=self.backbone.size,
                  decode_threads=self.decode_threads, prefetch=prefetch)

    def __iter__(self) -> Iterator[dict]:
        # decode threads and the student share the CPU for as long as the epoch runs; the
        # student computes as featurize's did (full fp32, deterministic kernels)
        with model_threads(self.device, self.decode_threads), parity_settings():
            for batch in super().__iter__():
                if batch.index:
                    with torch.no_grad():
                        student = self.backbone(batch.clips)  # [B, T', D]
                else:  # every clip failed: an empty batch, for a rank under DDP
                    student = torch.zeros(0, self.backbone.tokens, self.backbone.dim)  # [0, T', D]
                yield {
                    "student": student.float(),
                    "label": torch.tensor(batch.labels, dtype=torch.int64),
                    "key": batch.keys,
                    "index": torch.tensor(batch.index, dtype=torch.int64),
                }
