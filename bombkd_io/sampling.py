"""The two orders bombkd relies on, as pure functions.

- ``sample_indices``: which frames of a video make a clip. Every decoder uses it, and the indices
  are stored with each cached sample, so any clip can be reproduced.
- the epoch plan: which samples make each batch of an epoch. ``stream_plan`` is the one place it
  is derived: one (rank, worker) stream's shards, in reading order, and its batch sizes. The
  cached loader reads and cuts its shards by it; ``epoch_batches`` turns it into a rank's batches
  of sample indices, which the video loader replays over the video index, so the same seed gives
  the same batches in both modes.

The epoch order is a pure function of (seed, epoch, number of samples, shard size, batch size,
world size, workers per rank): change any of them and the batches change. Every (rank, worker)
stream reads whole shards, so there must be at least world size x workers shards; both loaders
refuse fewer when they are made (``check_streams``), with the same message.
"""
from __future__ import annotations

import numpy as np

from bombkd_io.errors import ConfigError

SAMPLING_MODES = ("uniform",)
DEFAULT_SHARD_SIZE = 1000


def sample_indices(num_frames: int, frames: int, mode: str = "uniform") -> np.ndarray:
    """Frame indices for a clip of ``frames`` frames from a video of ``num_frames`` frames.

    ``uniform``: the centre of each of ``frames`` equal segments, so short videos repeat frames
    by the same rule and long ones are covered end to end. Returns int64 ``[frames]``.
    """
    if num_frames < 1:
        raise ValueError(f"a video needs at least one decodable frame, got num_frames={num_frames}")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if mode != "uniform":
        raise ValueError(f"unknown sampling mode {mode!r}; expected one of {SAMPLING_MODES}")
    # Segment centres, (i + 0.5) * n / T, in exact integer arithmetic: identical on every machine.
    centres = ((2 * np.arange(frames, dtype=np.int64) + 1) * num_frames) // (2 * frames)
    return np.minimum(centres, num_frames - 1)


def shard_ranges(num_samples: int, shard_size: int) -> list[range]:
    """Shard ``k`` holds samples ``[k*S, (k+1)*S)`` of the split in index order."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [range(s, min(s + shard_size, num_samples)) for s in range(0, num_samples, shard_size)]


def check_streams(num_shards: int, world_size: int, num_workers: int, *, where: str = "") -> None:
    """Every (rank, worker) stream reads whole shards: ``ConfigError`` when there are fewer shards
    than ``world_size * max(1, num_workers)`` streams (DataLoader's 0 workers is one stream)."""
    workers = max(1, num_workers)
    if num_shards < world_size * workers:
        at = f"{where}: " if where else ""
        raise ConfigError(
            f"{at}{num_shards} shard(s), too few for {world_size} rank(s) x {workers} "
            "worker(s): each (rank, worker) stream reads whole shards; lower --workers, or lower "
            "--shard-size (for a feature cache: featurize again with a smaller --shard-size)")


def stream_shards(seed: int, epoch: int, num_shards: int, *, rank: int = 0, world_size: int = 1,
                  worker: int = 0, num_workers: int = 1) -> list[int]:
    """The shards one (rank, worker) stream reads this epoch, in reading order.

    The shard permutation is drawn before the split, so the ranks and workers together read every
    shard exactly once.
    """
    check_streams(num_shards, world_size, num_workers)
    order = np.random.default_rng([seed, epoch]).permutation(num_shards)
    streams = world_size * num_workers
    return [int(k) for k in order[rank * num_workers + worker::streams]]


def shard_order(seed: int, epoch: int, shard: int, size: int) -> np.ndarray:
    """Order of the samples within one shard (positions ``0..size-1``) this epoch."""
    return np.random.default_rng([seed, epoch, shard]).permutation(size)


def stream_samples(seed: int, epoch: int, num_samples: int, shard_size: int, *, rank: int = 0,
                   world_size: int = 1, worker: int = 0, num_workers: int = 1) -> np.ndarray:
    """Sample indices one (rank, worker) stream yields this epoch, in order."""
    ranges = shard_ranges(num_samples, shard_size)
    shards = stream_shards(seed, epoch, len(ranges), rank=rank, world_size=world_size,
                           worker=worker, num_workers=num_workers)
    parts = [np.asarray(ranges[k])[shard_order(seed, epoch, k, len(ranges[k]))] for k in shards]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def batch_sizes(count: int, batch_size: int, num_batches: int) -> list[int]:
    """Split ``count`` samples into exactly ``num_batches`` batches of at most ``batch_size``.

    Full batches first; where a stream has fewer samples than its peers, its last batches shrink,
    so every rank takes the same number of steps without dropping or repeating a sample. A stream
    with fewer samples than steps ends in empty batches: under DDP its rank still takes (zero)
    steps, so the gradient all-reduce of the other ranks never waits for it in vain.
    """
    sizes, left = [], count
    for j in range(num_batches):
        size = max(0, min(batch_size, left - (num_batches - 1 - j)))
        sizes.append(size)
        left -= size
    return sizes


def stream_plan(seed: int, epoch: int, num_samples: int, shard_size: int, batch_size: int, *,
                rank: int = 0, world_size: int = 1, worker: int = 0,
                num_workers: int = 1) -> tuple[list[int], list[int]]:
    """One (rank, worker) stream's epoch: the shards it reads, in reading order, and the sizes of
    the batches it cuts their samples (each shard in ``shard_order``) into.

    The stream takes as many batches as the longest stream of the same worker on any rank, so
    every rank takes the same number of steps (``batch_sizes``).
    """
    ranges = shard_ranges(num_samples, shard_size)
    streams = [stream_shards(seed, epoch, len(ranges), rank=r, world_size=world_size,
                             worker=worker, num_workers=num_workers)
               for r in range(world_size)]
    lengths = [sum(len(ranges[k]) for k in s) for s in streams]
    steps = max(-(-n // batch_size) for n in lengths)  # ceil, the longest rank's count
    return streams[rank], batch_sizes(lengths[rank], batch_size, steps)


def epoch_batches(seed: int, epoch: int, num_samples: int, shard_size: int, batch_size: int, *,
                  rank: int = 0, world_size: int = 1, num_workers: int = 1) -> list[np.ndarray]:
    """The batches (arrays of sample indices) that ``rank`` sees this epoch, in the order seen.

    Worker ``w`` of a rank cuts its own stream as ``stream_plan`` says; batches come round-robin
    over the workers that still have batches, which is how ``torch.utils.data.DataLoader``
    interleaves an iterable dataset. ``num_workers=0`` (in-process loading) behaves as one worker.
    """
    num_workers = max(1, num_workers)
    per_worker = []
    for w in range(num_workers):
        stream = dict(rank=rank, world_size=world_size, worker=w, num_workers=num_workers)
        _, sizes = stream_plan(seed, epoch, num_samples, shard_size, batch_size, **stream)
        samples = stream_samples(seed, epoch, num_samples, shard_size, **stream)
        per_worker.append(np.split(samples, np.cumsum(sizes)[:-1]))
    order, j = [], 0
    while any(j < len(b) for b in per_worker):
        order.extend(b[j] for b in per_worker if j < len(b))
        j += 1
    return order
