"""The frame-index rule and the epoch-order plan (bombkd_io.sampling)."""
import numpy as np
import pytest

from bombkd_io.errors import ConfigError
from bombkd_io.sampling import (batch_sizes, check_plan, check_streams, epoch_batches,
                                plan_inputs, sample_indices, shard_ranges, stream_samples)


def test_uniform_indices_are_segment_centres():
    assert sample_indices(32, 4).tolist() == [4, 12, 20, 28]
    assert sample_indices(16, 16).tolist() == list(range(16))


def test_short_clip_repeats_frames_in_order():
    idx = sample_indices(5, 16)
    assert len(idx) == 16 and idx.min() == 0 and idx.max() == 4
    assert np.all(np.diff(idx) >= 0)
    assert set(idx.tolist()) == set(range(5))


@pytest.mark.parametrize("n,t", [(1, 16), (7, 3), (300, 16), (17, 16)])
def test_indices_in_range_and_deterministic(n, t):
    idx = sample_indices(n, t)
    assert idx.dtype == np.int64 and idx.shape == (t,)
    assert 0 <= idx.min() and idx.max() < n
    assert np.array_equal(idx, sample_indices(n, t))


@pytest.mark.parametrize("bad", [dict(num_frames=0, frames=4), dict(num_frames=4, frames=0),
                                 dict(num_frames=4, frames=4, mode="random")])
def test_bad_arguments_are_refused(bad):
    with pytest.raises(ValueError):
        sample_indices(**bad)


def test_shards_hold_consecutive_samples():
    assert shard_ranges(7, 3) == [range(0, 3), range(3, 6), range(6, 7)]


def test_batch_sizes_fill_then_shrink():
    assert batch_sizes(10, 4, 3) == [4, 4, 2]
    assert batch_sizes(5, 4, 3) == [3, 1, 1]
    assert sum(batch_sizes(9, 8, 5)) == 9


def test_same_seed_same_batches_other_seed_other_order():
    a = epoch_batches(3, 0, 50, 10, 8)
    b = epoch_batches(3, 0, 50, 10, 8)
    c = epoch_batches(4, 0, 50, 10, 8)
    d = epoch_batches(3, 1, 50, 10, 8)
    flat = lambda bs: np.concatenate(bs).tolist()
    assert flat(a) == flat(b)
    assert flat(a) != flat(c) and flat(a) != flat(d)
    assert sorted(flat(a)) == list(range(50))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_cover_every_sample_once_with_equal_steps(world):
    n, shard, batch = 97, 8, 5
    per_rank = [epoch_batches(0, 2, n, shard, batch, rank=r, world_size=world)
                for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1, "every rank takes the same number of steps"
    seen = np.concatenate([np.concatenate(b) for b in per_rank])
    assert sorted(seen.tolist()) == list(range(n))
    assert all(1 <= len(x) <= batch for b in per_rank for x in b)


def test_a_rank_cuts_its_own_stream_into_batches():
    # one stream per rank, batches cut across shard boundaries: nothing about loader workers
    batches = epoch_batches(0, 0, 40, 10, 6, rank=1, world_size=2)
    stream = stream_samples(0, 0, 40, 10, rank=1, world_size=2)
    assert np.concatenate(batches).tolist() == stream.tolist()
    assert [len(b) for b in batches] == [6, 6, 6, 2]


def test_too_few_shards_for_the_ranks_is_a_clear_error():
    with pytest.raises(ValueError, match="shard-size"):
        epoch_batches(0, 0, 10, 10, 4, world_size=2)
    with pytest.raises(ConfigError, match=r"^ds: 1 shard\(s\), too few for 2 rank\(s\).*lower "
                       r"--shard-size"):
        check_streams(1, 2, where="ds")
    check_streams(2, 2)
    check_streams(1, 1)


def test_plan_inputs_differences_are_named():
    mine = plan_inputs(0, 100, 10, 8, 2)
    check_plan(dict(mine), mine)
    with pytest.raises(ConfigError) as info:
        check_plan({**mine, "seed": 1, "batch_size": 4}, mine, where="state")
    assert info.value.problems[:2] == ["state: the saved plan has seed=1, this loader 0",
                                       "state: the saved plan has batch_size=4, this loader 8"]


def test_a_rank_with_fewer_samples_than_steps_gets_empty_batches_not_negative_ones():
    # 21 samples in shards of 10 over 2 ranks: some epochs give one rank only the 1-sample shard
    for epoch in range(10):
        plans = [epoch_batches(0, epoch, 21, 10, 4, rank=r, world_size=2) for r in range(2)]
        assert len(plans[0]) == len(plans[1])
        assert all(len(b) >= 0 for p in plans for b in p)
        seen = sorted(i for p in plans for b in p for i in b.tolist())
        assert seen == list(range(21))
    assert batch_sizes(1, 4, 5) == [0, 0, 0, 0, 1]


def test_stream_samples_takes_the_split_as_named_arguments():
    streams = [stream_samples(3, 1, 80, 10, rank=r, world_size=4) for r in range(4)]
    assert sorted(np.concatenate(streams).tolist()) == list(range(80))
    assert all(len(s) == 20 for s in streams)
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_workers'"):
        stream_samples(0, 0, 40, 10, num_workers=1)
