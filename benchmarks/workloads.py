"""The data and workloads the benchmarks time, made of library calls only.

Nothing here re-implements a loader, a decoder or the trainer: the session's data is made by
``make_sample_data``, ``featurize`` and ``train_converters``; training goes through ``Trainer``;
the only additions are the in-memory twins (``InMemoryLoader``, clips kept in a list) that take
the loader out of a measurement.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from benchmarks.ledger import BenchSize
from benchmarks.scale import write_cache
from bombkd_io.loaders.cached import make_cached_loader
from bombkd_io.sample_data import make_sample_data
from bombkd_io.shards.manifest import load_manifest
from bombkd_train.config import ConverterTrainConfig, DataConfig, FeaturizeConfig, TrainConfig
from bombkd_train.converters import train_converters
from bombkd_train.featurize import featurize
from bombkd_train.trainer import MetricsLog, Trainer, train

DATASET, SPLIT = "ucf101", "train"
DTYPES = ("float32", "float16")


@dataclass
class Corpus:
    """The session's shared data: sample videos, one cache per dtype, converters."""

    videos: Path
    caches: dict[str, Path]                # dtype -> feature cache root
    converters: Path
    classes: int
    count: int                             # samples in the train split's cache


def make_videos(out: Path, size: BenchSize, *, codec: str = "vp9",
                per_class: int | None = None) -> Path:
    return make_sample_data(out, classes=size.classes, per_class=per_class or size.per_class,
                            codec=codec, seed=0)


def featurize_config(videos: Path, out: Path, size: BenchSize, dtype: str,
                     split: str = SPLIT) -> FeaturizeConfig:
    return FeaturizeConfig(dataset=DATASET, root=str(videos), split=split, student=size.student,
                           teachers=list(size.teachers), out=str(out),
                           shard_size=size.shard_size, dtype=dtype, frames=size.frames,
                           size=size.size, batch_size=size.batch_size, decode_threads=2,
                           device="auto")


def make_corpus(root: Path, size: BenchSize) -> Corpus:
    """Videos, a float32 and a float16 cache of the train split, and converters fitted on it."""
    videos = make_videos(root / "videos", size)
    caches = {dtype: root / f"cache-{dtype}" for dtype in DTYPES}
    for dtype in DTYPES:
        manifest = featurize(featurize_config(videos, caches[dtype], size, dtype))
    result = train_converters(ConverterTrainConfig(
        root=str(caches["float16"]), split=SPLIT, teachers=list(size.teachers),
        save_dir=str(root / "converters"), epochs=1, batch_size=size.batch_size, seed=0))
    return Corpus(videos=videos, caches=caches, converters=result.path,
                  classes=len(manifest.classes), count=manifest.count)


def train_config(corpus: Corpus, size: BenchSize, mode: str, save_dir: Path, *,
                 dtype: str = "float16", epochs: int = 1, cache: Path | None = None) -> TrainConfig:
    """The same run in either mode: video mode replays the cache's plan and student settings.

    ``cache``: train cached mode on another cache of the same student (a tiled one)."""
    if mode == "cached":
        data = DataConfig(loader="wds", root=str(cache or corpus.caches[dtype]), dataset=DATASET)
    elif mode == "video":
        data = DataConfig(loader="dali", root=str(corpus.videos), dataset=DATASET,
                          student=size.student, cache=str(corpus.caches[dtype]))
    else:
        raise ValueError(f"mode {mode!r}: expected 'cached' or 'video'")
    return TrainConfig(data=replace(data, batch_size=size.batch_size, seed=0, device="auto"),
                       split=SPLIT, teachers=list(size.teachers), converters=str(corpus.converters),
                       classes=corpus.classes, epochs=epochs, save_dir=str(save_dir),
                       progress=False)


class EpochRunner:
    """A set-up trainer; ``run()`` trains one more epoch of the same plan (epoch 0's batches).

    Re-running epoch 0 keeps every timed round on identical batches; the weights move on, which
    costs the same in every mode.
    """

    def __init__(self, cfg: TrainConfig):
        self.trainer = Trainer(cfg).setup()
        self.log = MetricsLog(Path(cfg.save_dir) / "metrics.jsonl", upto=None)
        self.samples = self.trainer.source.num_samples  # one epoch on one rank: every sample

    def run(self, epochs: int = 1) -> int:
        """Train ``epochs`` epochs of epoch 0's plan; returns the samples trained on."""
        return sum(self.trainer.train_epoch(0, self.log)["samples"] for _ in range(epochs))

    def use_loader(self, loader) -> None:
        """Feed the same trainer from another loader (the in-memory twin)."""
        self.trainer.source.loader = loader

    def close(self) -> None:
        self.trainer.close()


class InMemoryLoader:
    """Batches already in memory, behind the loader interface the trainer uses
    (``FeatureSource.loader``: set_epoch, num_batches, iteration, skipped)."""

    skipped = 0  # samples left out this epoch: none, the batches are whole

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def set_epoch(self, epoch: int) -> None:
        pass

    def num_batches(self, epoch: int | None = None) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def materialise(loader, epoch: int = 0) -> list[dict]:
    """Every batch of one epoch, kept in memory."""
    loader.set_epoch(epoch)
    return list(loader)


def features_by_key(batches) -> dict[str, np.ndarray]:
    """``key -> student features [T', D]`` from an iterable of batch dicts."""
    out = {}
    for batch in batches:
        feats = batch["student"].float().cpu().numpy()  # [B, T', D]
        out.update(zip(batch["key"], feats))
    return out


def cached_features(cache: Path, split: str = SPLIT) -> dict[str, np.ndarray]:
    loader = make_cached_loader(cache, split, batch_size=64, num_workers=0, pin_memory=False)
    return features_by_key(materialise(loader))


def tile_cache(corpus: Corpus, out: Path, count: int) -> Path:
    """A float16 cache of ``count`` samples that repeats the corpus' features and labels, in
    shards of the default size: an epoch long enough that per-epoch costs weigh what they would
    on a real dataset."""
    batches = materialise(make_cached_loader(corpus.caches["float16"], SPLIT, batch_size=64,
                                             num_workers=0, pin_memory=False))
    order = np.argsort(np.concatenate([b["index"].numpy() for b in batches]))
    features = np.concatenate([b["student"].numpy() for b in batches])[order]  # [N, T', D]
    labels = np.concatenate([b["label"].numpy() for b in batches])[order]       # [N]
    like = load_manifest(corpus.caches["float16"], SPLIT, dataset=DATASET).models["student"]
    write_cache(out, count, features=features, labels=labels, like=like, dataset=DATASET)
    return out


def train_records(cfg: TrainConfig) -> tuple[list[dict], list[dict]]:
    """Train ``cfg`` end to end; its (step, epoch) records from ``metrics.jsonl``."""
    train(cfg)
    lines = (Path(cfg.save_dir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return ([r for r in records if r["kind"] == "step"],
            [r for r in records if r["kind"] == "epoch"])
