"""Video mode without a model: a split's videos as uint8 clip batches, in the epoch plan's order.

The stages, in order (``VideoClipLoader``: the first three when it is made, the rest per epoch):

    index_dataset          -> VideoItems in split-file order, less the videos ``exclude`` names
    probe_index            -> the decodable ones (failures recorded, not fatal)
    check_streams          -> a split with fewer shards than ranks is refused
    epoch_batches          -> this rank's batches of positions, the plan the cached loader follows
    [start:]               -> from the batch a loaded state resumes at (nothing before is decoded)
    ClipLoader.batches     -> uint8 clips [B, T, S, S, 3], decoded in a background thread
    VideoBatch             -> the clips with their sample indices, keys and labels

Sample ``i`` of the plan is the ``i``-th decodable video in index order, which is exactly where
featurize puts it in the cache, so the same seed gives the same batches in either mode.
``state_dict`` / ``load_state_dict`` save and restore the position in the plan
(``bombkd_io.loaders.state``).
``bombkd_train.data`` maps the clips through the frozen student.
"""
from __future__ import annotations

import warnings
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bombkd_io.datasets import index_dataset, item_key, match_paths
from bombkd_io.errors import DataWarning
from bombkd_io.loaders.state import EpochCursor
from bombkd_io.sampling import DEFAULT_SHARD_SIZE, check_streams, epoch_batches, plan_inputs

if TYPE_CHECKING:
    import torch

    from bombkd_io.video import ClipLoader


@dataclass
class VideoBatch:
    """One batch of ``VideoClipLoader``: the clips and, per clip, its sample index, key, label."""

    clips: torch.Tensor   # uint8 [B, T, S, S, 3], on the GPU for device "gpu"
    index: list[int]      # sample indices (positions in the plan), one per clip
    keys: list[str]       # the cache's key of each clip's video
    labels: list[int]


class VideoClipLoader:
    """Clip batches of a split's decodable videos, in the cached loader's epoch order.

    Made in two steps, so that a split that cannot be planned is refused before any model is
    loaded: the constructor indexes, probes and checks the plan; ``open`` makes the decoder once
    the clip the model consumes (frames, size) is known.
    """

    def __init__(self, dataset: str, root: str | Path, split: str, *, batch_size: int = 8, seed: int = 0,
                 shard_size: int = DEFAULT_SHARD_SIZE, rank: int = 0, world_size: int = 1,
                 device: str = "cpu", exclude: Collection[str] = ()):
        from bombkd_io.video import probe_index  # video mode only: PyAV stays out of cached mode

        self.index = index_dataset(dataset, root, split, require_labels=True)  # trains, evaluates
        self.classes = list(self.index.classes)
        # ``exclude``: videos a cache left out (failed to decode when featurized), so that sample
        # i here is sample i of that cache; ``unmatched``: those that are not in this index
        excluded, self.unmatched = match_paths(self.index, exclude)
        wanted = [i for i in range(len(self.index.items)) if i not in excluded]
        # index positions of the decodable items (keys use the index position)
        self.positions, self.infos, self.failed = probe_index(self.index, wanted, device)
        if self.failed:
            path, why = self.failed[0]
            warnings.warn(f"{len(self.failed)} of the {len(wanted)} {split} videos in {root} "
                          f"cannot be read and are left out (first: {path}: {why})",
                          DataWarning, stacklevel=2)
        # every rank's stream needs a shard, as in the cached loader: refused here, at once
        num_shards = -(-len(self.positions) // shard_size)
        check_streams(num_shards, world_size, where=f"{root} ({split})")
        self.device = device
        self.seed, self.batch_size, self.shard_size = seed, batch_size, shard_size
        self.rank, self.world_size = rank, world_size
        self.cursor = EpochCursor()  # the epoch, and where its next iteration starts
        self.clips: ClipLoader | None = None  # the decoder, made by ``open``
        self._skipped_before = 0  # decode failures of a resumed epoch before its start
        self.decode_failed: list[tuple[str, str]] = []  # this epoch's, so far

    def open(self, *, frames: int, size: int, decode_threads: int, prefetch: int = 2) -> None:
        """Make the decoder: clips of ``frames`` frames of ``size`` x ``size`` pixels, decoded by
        ``decode_threads`` threads, ``prefetch`` batches ahead."""
        from bombkd_io.video import ClipLoader  # video mode only: DALI stays out of cached mode

        self.clips = ClipLoader(self.infos, frames=frames, size=size, batch_size=self.batch_size,
                                device=self.device, num_threads=decode_threads, prefetch=prefetch)

    def __len__(self) -> int:
        return self.num_batches(self.epoch)

    @property
    def num_samples(self) -> int:
        """The split's decodable videos, less those ``exclude`` named: the plan's samples."""
        return len(self.positions)

    @property
    def epoch(self) -> int:
        """The epoch the next iteration yields (``set_epoch``, ``load_state_dict``)."""
        return self.cursor.epoch

    def set_epoch(self, epoch: int) -> None:
        """Call before iterating each epoch: the batches of epoch ``epoch`` come next (from the
        loaded state's batch if ``epoch`` is the loaded state's epoch, else from the first)."""
        self.cursor.set_epoch(epoch)

    @property
    def plan_inputs(self) -> dict:
        """What the plan of every epoch is a function of, besides the epoch."""
        return plan_inputs(self.seed, self.num_samples, self.shard_size, self.batch_size,
                           self.world_size)

    def state_dict(self) -> dict:
        """Where this loader stands: the epoch, its batches already yielded, the plan's inputs
        and the samples skipped so far (``bombkd_io.loaders.state``)."""
        return self.cursor.state_dict(self.plan_inputs, self.skipped)

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``: the next iteration yields its epoch's batches from its
        ``"batch"`` on, decoding none before; ``ConfigError`` names every difference of plan."""
        self.cursor.load_state_dict(state, self.plan_inputs, self.num_batches,
                                    where="video loader state")
        self._skipped_before = max(0, self.cursor.skipped - len(self.failed))

    def plan(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of sample positions for ``epoch``: the cached loader's plan."""
        return epoch_batches(self.seed, epoch, self.num_samples, self.shard_size, self.batch_size,
                             rank=self.rank, world_size=self.world_size)

    def num_batches(self, epoch: int | None = None) -> int:
        """Batches this rank gets in ``epoch`` (default: the current one) before any skip."""
        return len(self.plan(self.epoch if epoch is None else epoch))

    @property
    def skipped(self) -> int:
        """Samples left out so far this epoch: this rank's videos that probed fine but did not
        decode, and (counted by rank 0, as every rank probes them all) the videos that did not
        probe. Videos ``exclude`` left out are not counted: the cache they come from counts
        none of its failed videos either."""
        unreadable = len(self.failed) if self.rank == 0 else 0
        return unreadable + self._skipped_before + len(self.decode_failed)

    def close(self) -> None:
        """Stop the decoder's threads and release its pipeline; safe to call twice."""
        if self.clips is not None:
            self.clips.close()

    def __iter__(self) -> Iterator[VideoBatch]:
        start = self.cursor.begin()
        if not start:
            self._skipped_before = 0  # a resumed epoch keeps the count its state saved
        self.decode_failed = []
        plan = self.plan(self.epoch)[start:]  # a resumed epoch decodes nothing before its start
        for j, clip_batch in enumerate(self.clips.batches([b.tolist() for b in plan]), start):
            self.cursor.batch = j + 1  # handed to the consumer (also when dropped below)
            # a video that probed fine but does not decode is recorded and skipped, not fatal
            for p, why in clip_batch.failed:
                path = self.index.items[self.positions[p]].path
                self.decode_failed.append((path, why))
                warnings.warn(f"{path}: {why}; skipped", stacklevel=2)
            # a batch whose every clip failed is dropped, but not under DDP: every rank must take
            # every step (its gradient all-reduce waits for all), so there it goes through empty
            if not clip_batch.positions and self.world_size == 1:
                continue
            where = [self.positions[p] for p in clip_batch.positions]  # index positions
            items = [self.index.items[i] for i in where]
            yield VideoBatch(clips=clip_batch.clips, index=list(clip_batch.positions),
                             keys=[item_key(i, item) for i, item in zip(where, items)],
                             labels=[item.label for item in items])
