"""Large caches, and reading one in a fresh process (time per sample, peak RSS).

``write_cache`` writes a student shard set of any size with the library's ``ShardSetWriter`` and
manifest: real features repeated (a large epoch for the cached-loader benchmark), or features of
a ViT-L-sized student, ``[8, 1024]`` fp16 = 16 KiB a sample, so that holding the data in memory
would show in the RSS (the scale benchmark). Run as a script, this file reads one cache through
``make_cached_loader`` for a few epochs and prints one JSON line: samples, seconds per epoch, RSS
before reading and peak RSS (``VmHWM``; ``ru_maxrss`` beside it), so each size's peak is its own.

    python benchmarks/scale.py CACHE_ROOT --epochs 3 --batch 32
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

SPLIT, DATASET = "train", "scale"
TOKENS, DIM = 8, 1024


def write_cache(root: Path, count: int, *, features: np.ndarray | None = None,
                labels: np.ndarray | None = None, like=None, shard_size: int = 1000,
                dataset: str = DATASET, dtype: str = "float16",
                teachers: tuple[str, ...] = ()) -> int:
    """A student cache of ``count`` samples under ``root``; returns the student set's bytes.

    Sample ``i`` holds ``features[i % N]`` (``[N, T', D]``) with label ``labels[i % N]``;
    ``like`` (a ModelEntry) names the backbone and clip they came from, so a trainer takes the
    cache for its own. Without features: random ViT-L-sized ones, ``[8, 1024]``. ``teachers``:
    a shard set of the same features under each of these names too (a four-model cache).
    """
    from bombkd_io.shards.manifest import Manifest, ModelEntry, save_manifest
    from bombkd_io.shards.writer import ShardSetWriter

    if features is None:
        rng = np.random.default_rng(0)
        features = rng.standard_normal((shard_size, TOKENS, DIM)).astype(np.float16)
        labels = np.arange(shard_size) % 10
        like = ModelEntry("student", "synthetic-vitl", DIM, TOKENS, 16, 224, "time", dtype)
    writers = {m: ShardSetWriter(root, dataset, SPLIT, m, shard_size, dtype)
               for m in ("student", *teachers)}
    for i in range(count):
        key = f"{i:07d}_tiled"
        for model, writer in writers.items():
            writer.write(key, features[i % len(features)],
                         {"cls": int(labels[i % len(labels)]), "json": {"path": key}}
                         if model == "student" else None)
    entries = {m: ModelEntry(m, like.backbone if m == "student" else f"synthetic-{m}", like.dim,
                             like.tokens, like.frames, like.size, like.pooling, dtype, w.close())
               for m, w in writers.items()}
    classes = [f"class{c}" for c in range(int(labels.max()) + 1)]
    save_manifest(Manifest(dataset, SPLIT, classes, shard_size, entries, count), root)
    return entries["student"].bytes


def drop_from_page_cache(paths: list[Path]) -> None:
    """Make the next read come from storage (no-op where posix_fadvise is missing)."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (KiB); 0 where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_kib() -> int:
    """Peak RSS of this process image. ``VmHWM`` where Linux has it: ``ru_maxrss`` also counts
    the peak of the process this one was forked from before ``exec`` (here: pytest itself)."""
    return _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure(roots: list[str], *, epochs: int, batch: int) -> dict:
    """Read every epoch of each cache with the training loader, the caches in turn."""
    from bombkd_io.loaders.cached import make_cached_loader

    loaders = [make_cached_loader(root, SPLIT, batch_size=batch, num_workers=0, pin_memory=False)
               for root in roots]
    rss_before = _status_kib("VmRSS")
    seconds = [[] for _ in roots]
    samples = [0 for _ in roots]
    for epoch in range(epochs):
        for i in [(epoch + j) % len(roots) for j in range(len(roots))]:
            loaders[i].set_epoch(epoch)
            start, samples[i] = time.perf_counter(), 0
            for b in loaders[i]:
                samples[i] += len(b["label"])
            seconds[i].append(time.perf_counter() - start)
    return {"samples": samples, "seconds": seconds, "rss_before_kib": rss_before,
            "peak_rss_kib": peak_rss_kib(),
            "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.roots, epochs=args.epochs, batch=args.batch)))


if __name__ == "__main__":
    sys.exit(main())
