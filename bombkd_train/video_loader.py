"""Video mode: decode clips, run the frozen student, yield the cached loader's batch dict.

The stages, in order (each a plain step of ``__iter__``):

    index_dataset          -> VideoItems in split-file order
    probe_index            -> the decodable ones (failures recorded, not fatal)
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

from bombkd_io.datasets import index_dataset, item_key, match_paths
from bombkd_io.errors import DataWarning
from bombkd_io.sampling import DEFAULT_SHARD_SIZE, check_streams, epoch_batches
from bombkd_io.video import ClipLoader, probe_index
from bombkd_train.backbones import create_backbone
from bombkd_train.threads import decode_threads_for, model_threads


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
        # i here is sample i of that cache; ``unmatched``: those that are not in this index
        excluded, self.unmatched = match_paths(self.index, exclude)
        wanted = [i for i in range(len(self.index.items)) if i not in excluded]
        # index positions of the decodable items (keys use the index position)
        self.positions, infos, self.failed = probe_index(self.index, wanted, device)
        if self.failed:
            path, why = self.failed[0]
            warnings.warn(f"{len(self.failed)} of the {len(wanted)} {split} videos in {root} "
                          f"cannot be read and are left out (first: {path}: {why})",
                          DataWarning, stacklevel=2)
        # every (rank, worker) stream needs a shard, as in the cached loader: refused here, at once
        num_shards = -(-len(self.positions) // shard_size)
        check_streams(num_shards, world_size, num_workers, where=f"{root} ({split})")
        self.device = device
        self.decode_threads = decode_threads = decode_threads or decode_threads_for()
        self.backbone = create_backbone(student, frames=frames, size=size, pool=pool, device=device)
        self.clips = ClipLoader(infos, frames=self.backbone.frames, size=self.backbone.size,
                                batch_size=batch_size, device=device,
                                num_threads=decode_threads, prefetch=prefetch)
        self.seed, self.batch_size, self.shard_size = seed, batch_size, shard_size
        self.rank, self.world_size = rank, world_size
        self.num_workers = max(1, num_workers)  # DataLoader's 0 (in-process) is one stream
        self.epoch = 0
        self.decode_failed: list[tuple[str, str]] = []  # this epoch's, so far

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

    @property
    def skipped(self) -> int:
        """Samples left out so far this epoch: this rank's videos that probed fine but did not
        decode, and (counted by rank 0, as every rank probes them all) the videos that did not
        probe. Videos ``exclude`` left out are not counted: the cache they come from counts
        none of its failed videos either."""
        unreadable = len(self.failed) if self.rank == 0 else 0
        return unreadable + len(self.decode_failed)

    def close(self) -> None:
        """Stop the decoder's threads and release its pipeline; safe to call twice."""
        self.clips.close()

    def __iter__(self):
        self.decode_failed = []
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

