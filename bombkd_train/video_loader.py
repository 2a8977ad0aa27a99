"""Video mode: decode clips, run the frozen student, yield the cached loader's batch dict.

The stages, in order (each a plain step of ``__iter__``):

    index_dataset          -> VideoItems in split-file order
    probe_videos           -> the decodable ones (failures recorded, not fatal)
    epoch_batches          -> this rank's batches of positions, the plan the cached loader follows
    ClipLoader.batches     -> uint8 clips [B, T, S, S, 3], decoded in a background thread
    student backbone       -> float32 features [B, T', D], while the next batch decodes
    batch dict             -> {"student", "label", "key", "index"}, as make_cached_loader yields

Sample ``i`` of the plan is the ``i``-th decodable video in index order, which is exactly where
featurize puts it in the cache, so the same seed gives the same batches in either mode.
"""
from __future__ import annotations

import warnings
from collections.abc import Collection

import numpy as np
import torch

from bombkd_io.datasets import index_dataset, item_key
from bombkd_io.sampling import DEFAULT_SHARD_SIZE, epoch_batches
from bombkd_io.video import ClipLoader, probe_videos
from bombkd_train.backbones import create_backbone
from bombkd_train.threads import decode_threads_for, model_threads


def plan_workers(num_workers: int, num_samples: int, shard_size: int, world_size: int) -> int:
    """The worker count the epoch plan uses, as the cached loader counts them: DataLoader's
    ``0`` is one stream. Where the cached loader would refuse more streams than shards, video
    mode (which has no worker processes) uses as many as there are shards per rank."""
    num_shards = max(1, -(-num_samples // shard_size))
    return max(1, min(max(1, num_workers), num_shards // max(1, world_size)))


class VideoFeatureLoader:
    """Batches of student features computed from videos, in the cached loader's epoch order."""

    def __init__(self, dataset: str, root, split: str, *, student: str, frames: int = 16,
                 size: int | None = None, pool: str = "time", batch_size: int = 8, seed: int = 0,
                 shard_size: int = DEFAULT_SHARD_SIZE, num_workers: int = 1, rank: int = 0,
                 world_size: int = 1, device: str = "cpu", decode_threads: int | None = None,
                 prefetch: int = 2, exclude: Collection[str] = ()):
        self.index = index_dataset(dataset, root, split)
        self.classes = list(self.index.classes)
        # ``exclude``: videos a cache left out (failed to decode when featurized), so that sample
        # i here is sample i of that cache
        excluded = set(exclude)
        wanted = [item.path for item in self.index.items if item.path not in excluded]
        infos, self.failed = probe_videos(wanted, device=device, on_error="skip")
        by_path = {info.path: info for info in infos}
        # index positions of the decodable items (keys use the index position)
        self.positions = [i for i, item in enumerate(self.index.items) if item.path in by_path]
        infos = [by_path[self.index.items[i].path] for i in self.positions]
        self.device = device
        self.decode_threads = decode_threads = decode_threads or decode_threads_for()
        self.backbone = create_backbone(student, frames=frames, size=size, pool=pool, device=device)
        self.clips = ClipLoader(infos, frames=self.backbone.frames, size=self.backbone.size,
                                batch_size=batch_size, device=device,
                                num_threads=decode_threads, prefetch=prefetch)
        self.seed, self.batch_size, self.shard_size = seed, batch_size, shard_size
        self.rank, self.world_size = rank, world_size
        self.num_workers = plan_workers(num_workers, len(self.positions), shard_size, world_size)
        self.epoch = 0
        self.decode_failed: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return self.num_batches(self.epoch)

    @property
    def num_samples(self) -> int:
        return len(self.positions)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of sample positions for ``epoch``: the cached loader's plan."""
        return epoch_batches(self.seed, epoch, self.num_samples, self.shard_size, self.batch_size,
                             rank=self.rank, world_size=self.world_size,
                             num_workers=self.num_workers)

    def num_batches(self, epoch: int | None = None) -> int:
        return len(self.plan(self.epoch if epoch is None else epoch))

    def __iter__(self):
        # decode threads and the student share the CPU for as long as the epoch runs
        with model_threads(self.device, self.decode_threads):
            yield from self._batches()

    def _batches(self):
        for clip_batch in self.clips.batches([b.tolist() for b in self.plan(self.epoch)]):
            # a video that probed fine but does not decode is recorded and skipped, not fatal
            for p, why in clip_batch.failed:
                path = self.index.items[self.positions[p]].path
                self.decode_failed.append((path, why))
                warnings.warn(f"{path}: {why}; skipped", stacklevel=2)
            if not clip_batch.positions:
                if self.world_size == 1:
                    continue
                # Every clip of this rank's batch failed. Under DDP every rank must still take
                # the step (its gradient all-reduce waits for all), so yield an empty batch.
                student = torch.zeros(0, self.backbone.tokens, self.backbone.dim)  # [0, T', D]
            else:
                with torch.no_grad():
                    student = self.backbone(clip_batch.clips)  # [B, T', D]
            where = [self.positions[p] for p in clip_batch.positions]  # index positions
            items = [self.index.items[i] for i in where]
            yield {
                "student": student.float(),
                "label": torch.tensor([item.label for item in items], dtype=torch.int64),
                "key": [item_key(i, item) for i, item in zip(where, items)],
                "index": torch.tensor(clip_batch.positions, dtype=torch.int64),
            }

