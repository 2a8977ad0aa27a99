"""Token-level payloads (several hundred KB to MB a sample) through the reader and the loader.

In process the loader maps each local shard of large rows and reads its rows into the batches
(by two threads); small rows, and workers, read shards into buffers; batches keep the cache
dtype. These tests check that what comes out is exactly what the writer stored, whatever path a
batch took, and that a buffer is never reused while a batch or a shard still views it. The
fusion head and the converters take the tokens as they are.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from bombkd_io.errors import ShardError
from bombkd_io.loaders.cached import LARGE_ROW_BYTES, make_cached_loader
from bombkd_io.sampling import epoch_batches
from bombkd_io.shards.manifest import Manifest, ModelEntry, load_manifest, save_manifest
from bombkd_io.shards.reader import BufferPool, read_shard
from bombkd_io.shards.writer import ShardSetWriter
from bombkd_train.converters import Converter
from bombkd_train.fusion import FusionHead, FusionModel, teacher_specs
from places import child_env

N, S, B = 11, 4, 3  # 3 shards, the last short; batches span shards


def token_cache(root: Path, tokens: int, dim: int, *, dtype: str = "float16") -> dict:
    """A student + teacher cache of distinct random token-level features; key -> arrays."""
    rng = np.random.default_rng(tokens)
    want = {}
    writers = {m: ShardSetWriter(root, "tok", "train", m, S, dtype) for m in ("student", "t")}
    for i in range(N):
        key = f"{i:06d}_clip"
        student = rng.standard_normal((tokens, dim)).astype(dtype)  # [T', D]
        teacher = rng.standard_normal((tokens // 2, dim + 8)).astype(dtype)
        writers["student"].write(key, student, {"cls": i % 3, "json": {"path": key}})
        writers["t"].write(key, teacher)
        want[key] = (student, teacher)
    shapes = {"student": (tokens, dim), "t": (tokens // 2, dim + 8)}
    models = {m: ModelEntry(m, "synthetic", d, t, 16, 224, "none", dtype, writers[m].close())
              for m, (t, d) in shapes.items()}
    save_manifest(Manifest("tok", "train", ["a", "b", "c"], S, models, N), root)
    return want


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """[256, 1024] fp16, 512 KiB a sample: shards of 2 MiB."""
    root = tmp_path_factory.mktemp("large")
    return root, token_cache(root, 256, 1024)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """[8, 64] fp16, 1 KiB a sample: batches go through the pipe as bytes."""
    root = tmp_path_factory.mktemp("small")
    return root, token_cache(root, 8, 64)


def check_exact(batches: list[dict], want: dict, dtype=torch.float16) -> None:
    for b in batches:
        assert b["student"].dtype == dtype and b["t"].dtype == dtype
        for row, key in enumerate(b["key"]):
            np.testing.assert_array_equal(b["student"][row].numpy(), want[key][0])
            np.testing.assert_array_equal(b["t"][row].numpy(), want[key][1])


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("cache", ["large", "small"])
def test_batches_are_the_stored_bytes_in_plan_order(request, cache, workers):
    root, want = request.getfixturevalue(cache)
    loader = make_cached_loader(root, "train", models=("student", "t"), batch_size=B, seed=3,
                                num_workers=workers)
    held = []
    for epoch in (0, 1, 2):  # every batch kept: no buffer may be reused under it
        loader.set_epoch(epoch)
        got = list(loader)
        plan = epoch_batches(3, epoch, N, S, B)
        assert [b["index"].tolist() for b in got] == [p.tolist() for p in plan]
        held += got
    check_exact(held, want)
    # workers only read shards: every batch is gathered in this process, never shared memory
    assert not any(b[name].is_shared() for b in held for name in ("student", "t"))


def test_worker_slots_are_reused_and_never_written_under_a_waiting_batch(large):
    """Workers read shards into the loader's slots, made once and reused every epoch; a shard
    is overwritten only once its batches are out (every other batch kept over three epochs,
    and an epoch cut short)."""
    root, want = large
    loader = make_cached_loader(root, "train", models=("student", "t"), batch_size=B, seed=5,
                                num_workers=2)
    held = []
    for epoch in (0, 1, 2):
        loader.set_epoch(epoch)
        for i, b in enumerate(loader):
            check_exact([b], want)  # as it arrives
            if i % 2:
                held.append(b)
        check_exact(held, want)
    slots = loader._slots
    assert slots.taken.shape == (2, loader.dataset.slots_per_worker(2)) == (2, 2)
    stopped = iter(loader)
    first = next(stopped)
    del stopped  # its workers are joined; the slots are free for the next iteration
    again = list(loader)
    assert loader._slots is slots  # the same shared memory, not fresh pages
    check_exact(held + [first] + again, want)


def test_a_batch_spanning_several_shards_comes_whole_from_any_workers(small):
    root, want = small
    plan = [p.tolist() for p in epoch_batches(0, 1, N, S, 9)]  # batches of 9, shards of 4
    for workers in (0, 1, 2):
        loader = make_cached_loader(root, "train", models=("student", "t"), batch_size=9,
                                    num_workers=workers)
        loader.set_epoch(1)
        got = list(loader)
        assert [b["index"].tolist() for b in got] == plan
        check_exact(got, want)
    assert loader.dataset.slots_per_worker(1) == 4  # 9 samples touch up to 4 shards here


def test_concurrent_iterations_do_not_share_the_slots(large):
    root, want = large
    loader = make_cached_loader(root, "train", models=("student", "t"), batch_size=B,
                                num_workers=2)
    a, b = iter(loader), iter(loader)
    got = [x for pair in zip(a, b) for x in pair]  # interleaved: the second has its own workers
    check_exact(got, want)
    assert len(got) == 2 * len(loader)


@pytest.mark.parametrize("tokens, dim", [(16, 32), (256, 256)])  # small rows; 256 KiB rows
def test_float32_cache_comes_as_float32(tmp_path, tokens, dim):
    want = token_cache(tmp_path, tokens, dim, dtype="float32")
    batches = list(make_cached_loader(tmp_path, "train", models=("student", "t"), batch_size=B,
                                      num_workers=0))
    check_exact(batches, want, torch.float32)


def test_a_shard_cut_short_during_an_epoch_stops_it_cleanly(tmp_path):
    """A shard truncated in place while its rows are being read into batches: a ShardError
    naming it comes out of the iteration, and no thread of the loader is left behind."""
    token_cache(tmp_path, 256, 1024)
    # a seed whose batches 0 and 1 both take rows of one shard: opened for batch 0, cut short
    # before batch 1 reads the rest of it
    seed, k = next((seed, shared.pop()) for seed in range(100)
                   if (shared := {int(i) // S for i in epoch_batches(seed, 0, N, S, B)[0]}
                       & {int(i) // S for i in epoch_batches(seed, 0, N, S, B)[1]}))
    loader = make_cached_loader(tmp_path, "train", batch_size=B, seed=seed, num_workers=0)
    batches = iter(loader)
    next(batches)
    shard = tmp_path / loader.manifest.model("student").shards[k].name
    os.truncate(shard, 4096)
    with pytest.raises(ShardError, match="became shorter while being read") as info:
        for _ in batches:
            pass
    assert info.value.shard == str(shard)
    assert not [t.name for t in threading.enumerate()
                if t.name.startswith(("bombkd-gather", "bombkd-shard-read"))]


def test_stopping_early_leaves_no_reader_thread(large):
    loader = make_cached_loader(large[0], "train", batch_size=B, num_workers=0)
    batches = iter(loader)
    next(batches)
    del batches  # the generator closes: its read-ahead thread is joined
    alive = [t.name for t in threading.enumerate() if t.name.startswith("bombkd-shard-read")]
    assert alive == []


def mapped_files(root: Path) -> list[str]:
    """The files under ``root`` this process has mapped now."""
    with open("/proc/self/maps") as f:
        return [line.split()[-1] for line in f if str(root) in line]


def open_files(root: Path) -> list[str]:
    """The files under ``root`` this process has open now."""
    opened = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            opened.append(os.readlink(fd))
        except OSError:  # closed since listed
            pass
    return [f for f in opened if f.startswith(str(root))]


@pytest.mark.parametrize("cache, mapped", [("large", True), ("small", False)])
def test_in_process_shards_of_large_rows_are_mapped_and_let_go(request, cache, mapped):
    """In process a local shard of large rows (LARGE_ROW_BYTES) is mapped and kept open, one
    of small rows read into a buffer; the batches are copies (they outlive the mappings), and no
    mapping or open file outlives the epoch."""
    root, want = request.getfixturevalue(cache)
    loader = make_cached_loader(root, "train", models=("student", "t"), batch_size=B,
                                num_workers=0)
    held, seen = [], []
    for batch in loader:
        seen.append(mapped_files(root))
        held.append(batch)
    assert all(bool(m) == mapped and all(Path(f).suffix == ".tar" for f in m) for m in seen)
    assert mapped_files(root) == [] and open_files(root) == []
    check_exact(held, want)


@pytest.mark.parametrize("cache, helped", [("large", True), ("small", False)])
def test_large_rows_are_gathered_by_two_threads(request, cache, helped):
    """Rows of LARGE_ROW_BYTES or more are copied by a second thread too; it is joined when
    the iteration stops, also early."""
    root, want = request.getfixturevalue(cache)
    assert (want["000000_clip"][0].nbytes >= LARGE_ROW_BYTES) == helped
    batches = iter(make_cached_loader(root, "train", models=("student", "t"), batch_size=B,
                                      num_workers=0))
    first = next(batches)
    threads = [t.name for t in threading.enumerate()]
    assert any(name.startswith("bombkd-gather") for name in threads) == helped
    check_exact([first], want)
    del batches
    assert not [name for name in (t.name for t in threading.enumerate())
                if name.startswith(("bombkd-gather", "bombkd-shard-read"))]


@pytest.mark.gpu
def test_pinned_batches_are_exact_and_stay_intact(large):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: pinned memory")
    root, want = large
    for workers in (0, 2):
        loader = make_cached_loader(root, "train", models=("student", "t"), batch_size=B,
                                    num_workers=workers, pin_memory=True)
        held = []
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            for b in loader:
                assert b["student"].is_pinned() and b["t"].is_pinned()
                b["student"].to("cuda", non_blocking=True)
                held.append(b)
        torch.cuda.synchronize()
        check_exact(held, want)


# ---- the reader's buffers ---------------------------------------------------------------------

def test_read_shard_into_a_buffer_views_it(large):
    root, _ = large
    model = load_manifest(root, "train").models["student"]
    entry = model.shards[0]
    pool = BufferPool()
    buffer = pool.take(entry.bytes)
    into = read_shard(root / entry.name, entry, model, labels=True, buffer=buffer)
    fresh = read_shard(root / entry.name, entry, model, labels=True)
    assert np.shares_memory(into.features, buffer)
    np.testing.assert_array_equal(into.features, fresh.features)
    assert into.keys == fresh.keys and (into.labels == fresh.labels).all()
    small_buffer = np.empty(entry.bytes - 1, np.uint8)  # too small: read into a new one
    again = read_shard(root / entry.name, entry, model, labels=True, buffer=small_buffer)
    assert not np.shares_memory(again.features, small_buffer)
    np.testing.assert_array_equal(again.features, fresh.features)


def test_a_buffer_is_reused_only_when_nothing_views_it():
    pool = BufferPool(limit=2)
    first = pool.take(100)
    view = first[10:20]
    first_id = id(first)
    del first
    second = pool.take(100)  # the first is still viewed: a new one
    assert id(second) != first_id and len(pool.buffers) == 2
    del view, second
    assert {id(pool.take(50))} <= {id(b) for b in pool.buffers}  # a free one that fits
    bigger = pool.take(200)  # none fits: a free one is replaced, the pool stays at its limit
    assert len(bigger) == 200 and len(pool.buffers) == 2


def test_take_waits_for_a_buffer_at_the_limit_unless_urgent():
    pool = BufferPool(limit=1)
    held = [pool.take(64)]
    target = id(held[0])
    releaser = threading.Timer(0.05, held.clear)
    releaser.start()
    assert id(pool.take(64, threading.Event())) == target  # waited for it
    releaser.join()
    viewing = pool.take(64)[:8]
    urgent = threading.Event()
    urgent.set()
    other = pool.take(64, urgent)  # at the limit, still viewed, urgent: a new one
    assert not np.shares_memory(other, viewing) and len(pool.buffers) == 1


# ---- token-level inputs go through the models as tokens ----------------------------------------

def test_converter_and_fusion_take_token_level_inputs():
    torch.manual_seed(0)
    tokens, dim = 196, 64
    converters = {"t": Converter(dim, 48, tokens, 2 * tokens)}
    model = FusionModel(converters, FusionHead(dim, teacher_specs(converters), 5))
    student = torch.randn(2, tokens, dim, dtype=torch.float16)  # as the loader delivers it
    x = student.float()  # [B, T', D]: the trainer's cast
    out = converters["t"](x)
    assert out.shape == (2, 2 * tokens, 48)
    nudged = x.clone()
    nudged[0, -1] += 1.0  # one token of one sample
    moved = (converters["t"](nudged) - out).abs().amax(dim=2)  # [B, 2T']
    # token-level: only the output tokens interpolated from the last input token move
    assert moved[0, -1] > 0 and moved[0, :-3].max() == 0 and moved[1].max() == 0
    logits = model(x).logits
    assert logits.shape == (2, 5)
    assert not torch.equal(model(nudged).logits[0], logits[0])
    assert torch.equal(model(nudged).logits[1], logits[1])


def test_workers_persist_across_epochs_until_closed(large):
    root, want = large
    loader = make_cached_loader(root, "train", models=("student", "t"), batch_size=B,
                                num_workers=2)
    pids = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        check_exact(list(loader), want)
        pids.append(sorted(w.pid for w in loader.loader._iterator._workers))
    assert pids[0] == pids[1]  # the same processes: each maps its slots once
    loader.close()
    for pid in pids[0]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert [b["index"].tolist() for b in loader] == \
        [p.tolist() for p in epoch_batches(0, 1, N, S, B)]


def test_a_process_that_never_closes_its_loader_exits(large):
    """Workers ignore SIGTERM (a preemption signal must not kill them mid-step), so the
    interpreter's exit cannot rely on terminating them: the loader closes itself at exit, killing
    a worker that does not stop. Mid-epoch too: here the workers have shards still to send."""
    root, _ = large
    script = (f"from bombkd_io.loaders.cached import make_cached_loader\n"
              f"loader = make_cached_loader({str(root)!r}, 'train', models=('student', 't'), "
              f"batch_size={B}, num_workers=2)\n"
              f"first = next(iter(loader))\n"
              f"print('pids', *sorted(w.pid for w in loader.loader._iterator._workers))\n")
    out = subprocess.run([sys.executable, "-c", script], env=child_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for pid in map(int, out.stdout.split()[1:]):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
