"""Both loaders' state: ``state_dict`` counts the batches handed out, ``load_state_dict`` resumes
mid-epoch without reading (cached) or decoding (video) what was consumed, and refuses another
plan naming each difference; the batches never depend on loader workers."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from bombkd_io.errors import ConfigError
from bombkd_io.loaders.cached import make_cached_loader
from bombkd_io.loaders.clips import VideoClipLoader
from test_cached_loader import B, N, S, make_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("state"))


def _content(batches: list[dict]) -> list[tuple]:
    return [(b["index"].tolist(), b["key"], b["label"].tolist(), b["student"].tolist(),
             b["videomae"].tolist()) for b in batches]


def _epoch(loader, epoch: int) -> list[dict]:
    loader.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("world_size", [1, 2])
def test_workers_do_not_change_the_batches(cache, world_size):
    for rank in range(world_size):
        seen = {}
        for workers in (0, 1, 2, 4):
            loader = make_cached_loader(cache, "train", models=("student", "videomae"),
                                        batch_size=5, seed=2, num_workers=workers, rank=rank,
                                        world_size=world_size)
            seen[workers] = _content(_epoch(loader, 1)) + _content(_epoch(loader, 4))
        assert seen[1] == seen[0] and seen[2] == seen[0] and seen[4] == seen[0]
        assert len(seen[0]) >= 4


@pytest.mark.parametrize("workers", [0, 2])
def test_state_counts_batches_handed_out_and_resumes_there(cache, workers):
    loader = make_cached_loader(cache, "train", models=("student", "videomae"), batch_size=B,
                                seed=5, num_workers=workers)
    full = _content(_epoch(loader, 2))
    loader.set_epoch(2)
    states = []
    for i, _ in enumerate(loader):
        states.append(loader.state_dict())
        assert states[-1]["batch"] == i + 1 and states[-1]["epoch"] == 2
    assert states[0] == {"version": 1, "epoch": 2, "batch": 1, "skipped": 0,
                         "plan": {"seed": 5, "num_samples": N, "shard_size": S,
                                  "batch_size": B, "world_size": 1}}
    for state in [states[0], states[2], states[4], states[-2], states[-1]]:
        other = make_cached_loader(cache, "train", models=("student", "videomae"),
                                   batch_size=B, seed=5, num_workers=2 - workers)
        other.load_state_dict(state)
        other.set_epoch(2)  # the same epoch keeps the start
        assert other.state_dict() == state
        assert _content(list(other)) == full[state["batch"]:]
        assert other.num_batches(2) == len(full)
        assert _content(_epoch(other, 2)) == full  # later iterations start at 0


def test_another_epoch_resets_the_start(cache):
    loader = make_cached_loader(cache, "train", batch_size=B, num_workers=0)
    loader.set_epoch(1)
    want = [b["index"].tolist() for b in loader]
    loader.load_state_dict({**loader.state_dict(), "epoch": 0, "batch": 3})
    loader.set_epoch(1)
    assert [b["index"].tolist() for b in loader] == want


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_epoch_reads_no_shard_before_its_start(cache, tmp_path, workers):
    loader = make_cached_loader(cache, "train", models=("student", "videomae"), batch_size=B,
                                seed=1, num_workers=workers)
    full = _content(_epoch(loader, 0))
    shards, sizes = loader.dataset.plan(0)
    start = (2 * S) // B + 1  # batch 3 of batches of 3: inside the third shard of the stream
    root = tmp_path / "c"
    shutil.copytree(cache, root)
    for k in shards[:2]:  # the two shards consumed whole are gone
        for model in ("student", "videomae"):
            (root / f"ds-train-{model}-{k:06d}.tar").unlink()
    resumed = make_cached_loader(root, "train", models=("student", "videomae"), batch_size=B,
                                 seed=1, num_workers=workers)
    resumed.load_state_dict({**loader.state_dict(), "epoch": 0, "batch": start})
    assert _content(list(resumed)) == full[start:]
    with pytest.raises(Exception, match="cannot read"):  # from the start, they are missed
        list(resumed)


def test_another_plan_is_refused_naming_each_difference(cache):
    state = make_cached_loader(cache, "train", batch_size=B, seed=0).state_dict()
    loader = make_cached_loader(cache, "train", batch_size=B + 1, seed=1, world_size=2, rank=1)
    with pytest.raises(ConfigError) as info:
        loader.load_state_dict(state)
    text = str(info.value)
    for part in ("seed=0, this loader 1", f"batch_size={B}, this loader {B + 1}",
                 "world_size=1, this loader 2"):
        assert part in text
    with pytest.raises(ConfigError, match="version 2 is not known"):
        loader.load_state_dict({**state, "version": 2})
    with pytest.raises(ConfigError, match=r"lacks \['skipped'\]"):
        loader.load_state_dict({k: v for k, v in state.items() if k != "skipped"})
    mine = make_cached_loader(cache, "train", batch_size=B)
    with pytest.raises(ConfigError, match="batch 99 is past the 8 batches of epoch 0"):
        mine.load_state_dict({**state, "batch": 99})


@pytest.fixture(scope="module")
def videos(tmp_path_factory, sample_root):
    root = tmp_path_factory.mktemp("videos") / "ucf"
    shutil.copytree(sample_root, root)
    return root


def _video_loader(root, **kw) -> VideoClipLoader:
    loader = VideoClipLoader("ucf101", root, "train", batch_size=3, seed=4, shard_size=4, **kw)
    loader.open(frames=2, size=32, decode_threads=1)
    return loader


def test_video_loader_resumes_without_decoding_what_was_consumed(videos):
    loader = _video_loader(videos)
    try:
        loader.set_epoch(1)
        full, states = [], []
        for b in loader:
            full.append((b.index, b.keys, b.labels, b.clips.clone()))
            states.append(loader.state_dict())
        assert [s["batch"] for s in states] == list(range(1, len(full) + 1))
        assert states[0]["plan"] == {"seed": 4, "num_samples": loader.num_samples,
                                     "shard_size": 4, "batch_size": 3, "world_size": 1}
    finally:
        loader.close()
    start = 2
    resumed = _video_loader(videos)  # probed while every video is readable
    consumed = [resumed.index.items[resumed.positions[p]].path for b in full[:start]
                for p in b[0]]
    saved = {p: open(p, "rb").read() for p in consumed}
    try:
        for p in consumed:  # a consumed video made unreadable: decoding it would be recorded
            open(p, "wb").write(b"not a video")
        resumed.load_state_dict(states[start - 1])
        got = [(b.index, b.keys, b.labels, b.clips) for b in resumed]
        assert resumed.decode_failed == [] and resumed.skipped == 0
        assert [g[:3] for g in got] == [f[:3] for f in full[start:]]
        assert all(torch.equal(g[3], f[3]) for g, f in zip(got, full[start:]))
        with pytest.warns(UserWarning):  # from the start, they are decoded (and fail)
            again = list(resumed)
        assert len(again) == len(full) - start  # the batches of failed videos are dropped
        assert len(resumed.decode_failed) == len(consumed)
        assert resumed.state_dict()["skipped"] == len(consumed)
    finally:
        for p, raw in saved.items():
            open(p, "wb").write(raw)
        resumed.close()


def test_video_and_cached_loaders_share_the_plan_state(videos, cache):
    loader = _video_loader(videos)
    try:
        cached = make_cached_loader(cache, "train", batch_size=3, seed=4)
        with pytest.raises(ConfigError, match=f"num_samples={N}, this loader "
                                              f"{loader.num_samples}"):
            loader.load_state_dict(cached.state_dict())
    finally:
        loader.close()
    assert np.array_equal([len(b) for b in loader.plan(0)], [3] * (loader.num_samples // 3))


@pytest.mark.parametrize("world_size", [1, 2])
def test_decode_threads_and_prefetch_do_not_change_the_video_batches(videos, world_size):
    seen = []
    for threads, prefetch in ((1, 1), (2, 3)):
        loader = VideoClipLoader("ucf101", videos, "train", batch_size=3, seed=4, shard_size=4,
                                 rank=world_size - 1, world_size=world_size)
        loader.open(frames=2, size=32, decode_threads=threads, prefetch=prefetch)
        try:
            loader.set_epoch(3)
            seen.append([(b.index, b.keys, b.clips.clone()) for b in loader])
        finally:
            loader.close()
    assert [s[:2] for s in seen[0]] == [s[:2] for s in seen[1]] and len(seen[0]) >= 2
    assert all(torch.equal(a[2], b[2]) for a, b in zip(*seen))
