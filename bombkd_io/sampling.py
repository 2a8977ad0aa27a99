"""The two orders bombkd relies on, as pure functions.

- ``sample_indices``: which frames of a video make a clip. Every decoder uses it, and the indices
  are stored with each cached sample, so any clip can be reproduced.
- the epoch plan: which samples make each batch of an epoch. ``stream_plan`` is the one place it
  is derived: one rank's shards, in reading order, and its batch sizes. The cached loader reads
  and cuts its shards by it; ``epoch_batches`` turns it into a rank's batches of sample indices,
  which the video loader replays over the video index, so the same seed gives the same batches
  in both modes.

The epoch order is a pure function of (seed, epoch, number of samples, shard size, batch size,
world size) (``plan_inputs``): change any of them and the batches change. Loader workers,
prefetch depth and decode threads are not inputs: they only fetch ahead. Every rank's stream
reads whole shards, so there must be at least world size shards; both loaders refuse fewer when
they are made (``check_streams``), with the same message.
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


def check_streams(num_shards: int, world_size: int, *, where: str = "") -> None:
    """Every rank's stream reads whole shards: ``ConfigError`` when there are fewer shards than
    ranks."""
    if num_shards < world_size:
        at = f"{where}: " if where else ""
        raise ConfigError(
            f"{at}{num_shards} shard(s), too few for {world_size} rank(s): each rank's stream "
            "reads whole shards; lower --shard-size (for a feature cache: featurize again with "
            "a smaller --shard-size), or use fewer ranks")


def stream_shards(seed: int, epoch: int, num_shards: int, *, rank: int = 0,
                  world_size: int = 1) -> list[int]:
    """The shards one rank's stream reads this epoch, in reading order.

    The shard permutation is drawn before the split, so the ranks together read every shard
    exactly once.
    """
    check_streams(num_shards, world_size)
    order = np.random.default_rng([seed, epoch]).permutation(num_shards)
    return [int(k) for k in order[rank::world_size]]


def shard_order(seed: int, epoch: int, shard: int, size: int) -> np.ndarray:
    """Order of the samples within one shard (positions ``0..size-1``) this epoch."""
    return np.random.default_rng([seed, epoch, shard]).permutation(size)


def stream_samples(seed: int, epoch: int, num_samples: int, shard_size: int, *, rank: int = 0,
                   world_size: int = 1) -> np.ndarray:
    """Sample indices one rank's stream yields this epoch, in order."""
    ranges = shard_ranges(num_samples, shard_size)
    shards = stream_shards(seed, epoch, len(ranges), rank=rank, world_size=world_size)
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
                rank: int = 0, world_size: int = 1) -> tuple[list[int], list[int]]:
    """One rank's epoch: the shards it reads, in reading order, and the sizes of the batches
    its samples (each shard in ``shard_order``) are cut into.

    The rank takes as many batches as the longest rank, so every rank takes the same number of
    steps (``batch_sizes``).
    """
    ranges = shard_ranges(num_samples, shard_size)
    streams = [stream_shards(seed, epoch, len(ranges), rank=r, world_size=world_size)
               for r in range(world_size)]
    lengths = [sum(len(ranges[k]) for k in s) for s in streams]
    steps = max(-(-n // batch_size) for n in lengths)  # ceil, the longest rank's count
    return streams[rank], batch_sizes(lengths[rank], batch_size, steps)


def epoch_batches(seed: int, epoch: int, num_samples: int, shard_size: int, batch_size: int, *,
                  rank: int = 0, world_size: int = 1) -> list[np.ndarray]:
    """The batches (arrays of sample indices) that ``rank`` sees this epoch, in the order seen:
    its stream (``stream_samples``) cut into the sizes of ``stream_plan``."""
    _, sizes = stream_plan(seed, epoch, num_samples, shard_size, batch_size, rank=rank,
                           world_size=world_size)
    samples = stream_samples(seed, epoch, num_samples, shard_size, rank=rank,
                             world_size=world_size)
    return np.split(samples, np.cumsum(sizes)[:-1])


def plan_inputs(seed: int, num_samples: int, shard_size: int, batch_size: int,
                world_size: int) -> dict:
    """What the plan of every epoch is a function of, besides the epoch: a loader's
    ``state_dict()["plan"]``."""
    return {"seed": seed, "num_samples": num_samples, "shard_size": shard_size,
            "batch_size": batch_size, "world_size": world_size}


def check_plan(saved: dict, mine: dict, *, where: str = "") -> None:
    """``ConfigError`` naming every input of a saved plan that differs from this one's."""
    at = f"{where}: " if where else ""
    problems = [f"{at}the saved plan has {key}={saved.get(key)!r}, this loader {value!r}"
                for key, value in mine.items() if saved.get(key) != value]
    problems += [f"{at}the saved plan has {key}={saved[key]!r}, unknown here"
                 for key in saved if key not in mine]
    if problems:
        raise ConfigError(problems + ["resume with the seed, batch size, world size and data "
                                      "the state was saved with"])
