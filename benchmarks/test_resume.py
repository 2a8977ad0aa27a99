"""Resuming mid-epoch: the time to the first batch after ``load_state_dict`` at 0%, 50% and 90%
of an epoch, for both loaders.

    resume-cached/P    the cached loader (in process, and with 2 workers: ``-2w``) over a cache
                       of ViT-L-sized features (``benchmarks/scale.py``, ``scale_samples``
                       samples, 8 shards), resumed at P% of the epoch: state loaded, first batch
    resume-video/P     the video loader (decode only, no student) over the corpus videos

Each round resumes at every point once, in a rotating order, each from a settled loader (see
``_time_resumes``); the iteration is closed after its first batch, outside the timed part. A
resumed epoch reads only the shard that holds its first batch and decodes only its own clips,
so the check: the first batch at 90% comes within 1.5x of the first batch at 0% (rate at 90% /
rate at 0% >= 1 / 1.5), the median of the rounds.
"""
from __future__ import annotations

import time

import pytest

from benchmarks.scale import DATASET, write_cache
from benchmarks.workloads import DATASET as VIDEO_DATASET
from bombkd_io.loaders.cached import make_cached_loader
from bombkd_io.loaders.clips import VideoClipLoader

POINTS = (0, 50, 90)  # percent of the epoch done
RESUME_MIN = 1 / 1.5  # the first batch at 90% within 1.5x of the first batch at 0%


def _first_batch_seconds(loader, state: dict, batch: int) -> float:
    start = time.perf_counter()
    loader.load_state_dict({**state, "batch": batch})
    batches = iter(loader)
    next(batches)
    seconds = time.perf_counter() - start
    batches.close()  # stop its workers or decode thread, untimed
    return seconds


def _time_resumes(ledger, name: str, loader, rounds: int) -> None:
    """Resume ``loader`` at each point, ``rounds`` rounds in a rotating order (one warm-up).

    Each timed resume starts from the same settled loader: an untimed resume at the last batch
    first, whose one shard is read by the time its batch comes. Without it a resume paid for the
    reads the previous one left in flight (persistent workers finish a shard read before they
    take the next iteration), and in the rotation 90% mostly followed 50%, which reads two
    shards, while 0% mostly followed 90%: beside a busy process 90% / 0% fell to 0.55 with 2
    workers, though 90% reads one shard and 0% two."""
    state, count = loader.state_dict(), loader.num_batches(0)
    at = {p: min(count - 1, count * p // 100) for p in POINTS}
    seconds = {p: [] for p in POINTS}
    for r in range(rounds + 1):
        for p in POINTS[r % len(POINTS):] + POINTS[:r % len(POINTS)]:
            _first_batch_seconds(loader, state, count - 1)  # settle (see above), untimed
            seconds[p].append(_first_batch_seconds(loader, state, at[p]))
    for p in POINTS:
        ledger.add(f"{name}/{p}", count=1, seconds=seconds[p][1:], unit="first batches")
    ledger.notes.setdefault("resume", {})[name] = {"batches": count, "at": at}


def _check(ledger, name: str, bench_size) -> None:
    ms = " / ".join(f"{ledger.get(f'{name}/{p}').median_s * 1e3:.1f}" for p in POINTS)
    ledger.require("resume-90", f"{name}: first batch after resuming at 90% vs at 0% "
                   f"(at 0% / 50% / 90%: {ms} ms)",
                   ledger.ratios(f"{name}/90", f"{name}/0"), ">=",
                   bench_size.limit("resume-90", RESUME_MIN), unit="x")


@pytest.fixture(scope="module")
def resume_cache(bench_dir, bench_size):
    root = bench_dir / "resume-cache"
    write_cache(root, bench_size.scale_samples, shard_size=max(1, bench_size.scale_samples // 8))
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_cached(ledger, bench_size, resume_cache, workers):
    name = "resume-cached" + (f"-{workers}w" if workers else "")
    loader = make_cached_loader(resume_cache, "train", batch_size=32, num_workers=workers,
                                dataset=DATASET, pin_memory=False)
    _time_resumes(ledger, name, loader, bench_size.rounds + 2)
    _check(ledger, name, bench_size)


def test_resume_video(ledger, bench_size, corpus):
    loader = VideoClipLoader(VIDEO_DATASET, corpus.videos, "train", batch_size=4,
                             shard_size=bench_size.shard_size)
    loader.open(frames=bench_size.frames, size=bench_size.size, decode_threads=2)
    try:
        _time_resumes(ledger, "resume-video", loader, bench_size.rounds)
    finally:
        loader.close()
    _check(ledger, "resume-video", bench_size)
