"""Cached mode: stream feature shards into training batches, in the order of ``epoch_batches``.

A rank reads the shards ``stream_plan`` gives it, permutes each with ``shard_order`` and cuts
the stream into the plan's batch sizes, so the batches equal ``bombkd_io.sampling.epoch_batches``
exactly (and so equal the video loader's), whatever the number of workers. The stages, in the
loader's process (``CachedFeatureDataset.batches``):

    plan_units     this rank's shards from the start batch on, each cut at the batch boundaries
    _read          each shard whole, the next one in a thread meanwhile: in process a local
                   shard of large rows (``LARGE_ROW_BYTES``) is opened and its headers checked
                   once its pages are in the page cache (``ShardFile``), any other read into a
                   reused buffer; or received from the workers, unit by unit (below)
    _permute       the shard's positions in ``shard_order``
    _cut           (batch j, pieces): a batch that spans shards, once all its pieces are there
    _pack          each model's rows gathered once into the batch tensor (reused or pinned);
                   large rows by two threads (``_gather``)

With ``W`` DataLoader workers, the workers only read: unit ``u`` (the ``u``-th shard of the
stream) is read by worker ``u % W`` into a shared slot (``bombkd_io.loaders.handover``) and
sent as the slot's number; the DataLoader delivers the workers' items round-robin, which is
unit order, so the loader's process cuts and gathers exactly as in process. A loaded state
(``state_dict``) starts the stream at its batch: no shard before it is read, no position of its
shard before it gathered.

In process, each byte of a local shard of large rows (``LARGE_ROW_BYTES``: token-level
features) is copied once: read from the page cache straight into its row of the batch tensor
(a cold shard is first read into the page cache, sequentially, in the read-ahead thread).
Small rows, workers and remote shards copy twice: read into a shard buffer, then gathered.
Batches keep the cache's dtype: the consumer casts on its device (``.to(device).float()``),
which halves host memory traffic and PCIe bytes for fp16 caches and changes no value. Memory
is bounded by two shards per model, in process and per worker (the loader's process maps the
workers' slots), whatever the split's size. Workers die with the process that iterates the
loader, also when it is killed (``bombkd_io.workers``).
"""
from __future__ import annotations

import functools
import math
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bombkd_io.errors import ConfigError, DatasetError, ErrorPolicy, ShardError
from bombkd_io.loaders.handover import ShardSlots, populate
from bombkd_io.loaders.state import EpochCursor
from bombkd_io.names import is_url, locate
from bombkd_io.sampling import check_streams, plan_inputs, shard_order, shard_ranges, stream_plan
from bombkd_io.shards.codec import DTYPES
from bombkd_io.shards.cache import ShardCache
from bombkd_io.shards.manifest import Manifest, ShardEntry, load_manifest, manifest_path
from bombkd_io.shards.reader import CAN_MAP, BufferPool, ShardData, local_path, read_shard
from bombkd_io.storage import check_root, is_remote
from bombkd_io.workers import DieWithParent, track

BATCH_BUFFERS = 4  # reused batch buffers (more are allocated while batches are held)
# A model whose rows (samples) take at least this many bytes (token-level features) is read in
# process straight from the open shard into the batches, by two threads (``_read_pooled``,
# ``_gather``); smaller rows (pooled features) come from the shard read whole into a reused
# buffer, where a read per row costs more than the copy it saves (on the 2-core VM: 0.78 vs
# 0.53 of a raw warm read at 512 KiB, even at 128 KiB, half the rate at 24 KiB).
LARGE_ROW_BYTES = 256 << 10
PREFETCH = 2  # shards a worker sends ahead (DataLoader's prefetch_factor)
WORKER_GRACE_S = 5.0  # close(): a worker not gone by then is killed
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}
Piece = tuple[int, dict[str, ShardData], np.ndarray]  # (shard k, data per model, positions)


class Unit(NamedTuple):
    """One shard of a rank's stream, as a unit of work: the batches (or their parts) in it."""
    shard: int                          # k
    cuts: list[tuple[int, int, int]]    # (batch j, lo, hi): positions [lo, hi) of its shard order


def plan_units(shards: list[int], lengths: list[int], sizes: list[int],
               start: int = 0) -> list[Unit]:
    """The units of a rank's stream from batch ``start`` on: each shard with a sample of batch
    ``start`` or later (``lengths``: samples per shard, in stream order), cut at the boundaries
    of the batches of ``sizes``. Empty batches lie in no unit."""
    bounds = np.cumsum([0] + list(sizes))  # batch j: stream positions [bounds[j], bounds[j+1])
    begin, units, offset, j = int(bounds[start]), [], 0, start
    for k, n in zip(shards, lengths):
        lo, end = max(offset, begin), offset + n
        cuts = []
        while lo < end and j < len(sizes):
            hi = min(int(bounds[j + 1]), end)
            if hi > lo:
                cuts.append((j, lo - offset, hi - offset))
            lo = max(lo, hi)
            if hi == bounds[j + 1]:
                j += 1
        if cuts:
            units.append(Unit(k, cuts))
        offset = end
    return units


def pieces_per_batch(units: list[Unit], sizes: list[int]) -> list[int]:
    """How many units each batch has a part in (0 for an empty batch)."""
    count = [0] * len(sizes)
    for unit in units:
        for j, _, _ in unit.cuts:
            count[j] += 1
    return count


def _dist_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values win; else torch.distributed's when it is initialised; else (0, 1)."""
    if rank is None or world_size is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
    return (0 if rank is None else rank), (1 if world_size is None else world_size)


class CachedFeatureDataset(IterableDataset):
    """The cached loader's stages (see the module docstring) over a format-1 cache: batch dicts
    ``{"student": [B,T',D] in the cache dtype, "label": int64 [B], "key": [str], "index": int64
    [B]}`` (+ one entry per teacher in ``models``); in a DataLoader worker, its shards."""

    def __init__(self, root: str | Path, split: str, *, models: Sequence[str] = ("student",),
                 batch_size: int = 8, seed: int = 0, dataset: str | None = None,
                 rank: int | None = None, world_size: int | None = None,
                 on_error: str = "raise", shard_cache: ShardCache | None = None):
        rank, world_size = _dist_rank_world(rank, world_size)
        models = list(models)
        problems = []
        if batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            problems.append(f"rank {rank} is not in [0, world_size={world_size})")
        try:
            policy = ErrorPolicy(on_error)
        except ConfigError as exc:
            problems += exc.problems
        if "student" not in models or len(set(models)) != len(models):
            problems.append(f"models must name 'student' (it carries keys and labels) once, "
                            f"plus any teachers; got {models}")
        if problems:
            raise ConfigError(problems)
        check_root(root, "root")
        self.root = root if is_url(root) else Path(root)  # a URL stays a string (storage.py)
        self.manifest = load_manifest(self.root, split, dataset)
        self.shard_cache = shard_cache if is_remote(root) else None  # local: read in place
        if not self.manifest.labels:
            path = manifest_path(root, self.manifest.dataset, split)
            raise DatasetError(f"{path}: split {split!r} has no labels in this cache, so it "
                               "can be featurized but not trained or evaluated on; pass a "
                               "labelled --split")
        self.entries = {m: self.manifest.model(m) for m in models}
        self.classes = len(self.manifest.classes)  # labels outside [0, classes) are bad samples
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.start = 0  # the batch of ``epoch`` the next iteration starts at (a loaded state)
        self.rank, self.world_size = rank, world_size
        self.policy = policy  # raise or skip, and what this epoch left out
        self.pin_memory = False  # gather straight into pinned memory
        self._pools: dict[str, BufferPool] = {}  # reused across epochs (fresh pages are slow)
        self.slots: ShardSlots | None = None  # shards read by workers (``CachedLoader``)
        self._populated = False  # this worker has mapped its slots
        self._iterations = 0  # the DataLoader's iterations this worker has begun

    def __getstate__(self) -> dict:
        # a worker started by spawn makes its own pools and maps its slots itself
        return {**self.__dict__, "_pools": {}, "_populated": False, "_iterations": 0}

    @property
    def num_shards(self) -> int:
        """Shards per model in this split."""
        return len(self.entries["student"].shards)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration yield ``epoch``'s batches (their order depends on it)."""
        self.epoch = epoch

    def check_streams(self) -> None:
        """Refuse, naming the cache, a split with fewer shards than ranks."""
        check_streams(self.num_shards, self.world_size, where=f"cache {self.root}")

    @property
    def plan_inputs(self) -> dict:
        """What the plan of every epoch is a function of, besides the epoch."""
        return plan_inputs(self.seed, self.manifest.count, self.manifest.shard_size,
                           self.batch_size, self.world_size)

    def plan(self, epoch: int) -> tuple[list[int], list[int]]:
        """(shards this rank reads, in order; its batch sizes): ``stream_plan``.

        The manifest's shard counts are those of ``shard_ranges(count, shard_size)``, as
        ``stream_plan`` assumes: ``check_manifest`` refuses any other when it is read.
        """
        return stream_plan(self.seed, epoch, self.manifest.count, self.manifest.shard_size,
                           self.batch_size, rank=self.rank, world_size=self.world_size)

    def units(self, epoch: int, start: int = 0) -> tuple[list[Unit], list[int]]:
        """(this rank's units of ``epoch`` from batch ``start`` on, its batch sizes)."""
        shards, sizes = self.plan(epoch)
        ranges = shard_ranges(self.manifest.count, self.manifest.shard_size)
        return plan_units(shards, [len(ranges[k]) for k in shards], sizes, start), sizes

    @property
    def row_bytes(self) -> dict[str, int]:
        """Bytes of one sample of each model."""
        return {name: e.tokens * e.dim * DTYPES[e.dtype].itemsize
                for name, e in self.entries.items()}

    @property
    def shard_bytes(self) -> dict[str, int]:
        """Bytes of each model's largest shard: a shard buffer's size."""
        return {name: max(s.bytes for s in e.shards) for name, e in self.entries.items()}

    def slots_per_worker(self, workers: int) -> int:
        """Shard slots each of ``workers`` workers needs: the loader's process holds every
        shard of a batch until the batch is whole, and the worker of the next shard needs a
        slot besides its shards among them; at least two (one cut, one read ahead)."""
        size, count = self.manifest.shard_size, self.manifest.count
        span = -(-(self.batch_size - 1) // size) + 1 + (count % size > 0)  # shards a batch spans
        return max(2, (span - 1) // workers + 1)

    def __iter__(self) -> Iterator:
        """In a DataLoader worker: the shards of its units, sent (``_send``). In process: the
        batch dicts of the current epoch from ``start`` on (``batches``)."""
        info = get_worker_info()
        if info is not None:  # the DataLoader's i-th iteration in this worker (see handover)
            i, self._iterations = self._iterations, self._iterations + 1
            return self._send(info.id, info.num_workers, i)
        return (batch for _, batch in self.batches(self.epoch, self.start))

    def batches(self, epoch: int, start: int = 0,
                received: Iterator | None = None) -> Iterator[tuple[int, dict]]:
        """(j, batch j) for each non-empty batch of ``epoch`` from ``start`` on; the shards read
        here, or ``received`` from workers ((k, data) in unit order)."""
        units, _ = self.units(epoch, start)
        self.policy = self.policy.fresh()  # per epoch
        batch_pool = self._pools.setdefault("", BufferPool(BATCH_BUFFERS))  # "": the batches
        alloc = functools.partial(_in_process, batch_pool, pin=self.pin_memory)
        if received is None:
            pools = {name: self._pools.setdefault(name, BufferPool()) for name in self.entries}
            received = self._read([u.shard for u in units], functools.partial(
                self._read_pooled, pools))         # (k, {model: ShardData}) per unit, one ahead
        stream = self._permute(received, epoch)  # (k, data, positions in shard_order)
        parts = _cut(stream, units, pieces_per_batch(units, self.plan(epoch)[1]))
        helper = ThreadPoolExecutor(1, thread_name_prefix="bombkd-gather")  # see _gather
        try:
            for j, pieces in parts:                  # (j, gathered batch j)
                batch = self._pack(pieces, alloc, helper)
                del pieces  # a shard is free once no batch of it waits (see handover)
                yield j, batch
        finally:
            helper.shutdown(wait=True)
            # closed now, not when collected: an exception's traceback keeps these generators,
            # and with them the read-ahead thread, alive
            for stage in (parts, stream, received):
                stage.close()

    def _send(self, worker: int, num_workers: int, i: int) -> Iterator[dict]:
        """A worker's part of the DataLoader's ``i``-th iteration: the shards of units
        ``worker, worker + W, ...`` read into its slots, each sent as ``ShardSlots.sent`` plus
        its unit, shard and the samples this worker skipped so far."""
        epoch, start, tag = self.slots.iteration(i)
        if not tag:  # long over
            return
        units, _ = self.units(epoch, start)
        mine = list(enumerate(units))[worker::num_workers]  # (u, unit)
        self.policy = self.policy.fresh()
        slots = self.slots
        if not self._populated:  # once per worker process: its mapping lasts
            for s in range(len(slots.buffers[worker])):
                for buffer in slots.arrays(worker, s).values():
                    populate(buffer)
            self._populated = True

        def read(k: int, urgent: threading.Event) -> tuple[int, dict[str, ShardData]]:
            slot, buffers = slots.take(worker, tag)  # waits for this process to free one
            return slot, self._read_one(k, lambda name, nbytes, source: buffers[name])

        for (u, _), (k, (slot, data)) in zip(mine, self._read([x.shard for _, x in mine], read)):
            sent = slots.sent(worker, slot, data)
            del data
            yield {**sent, "unit": u, "shard": k, "skipped": (worker, self.policy.samples)}

    def _read(self, shards: list[int], read_one) -> Iterator[tuple[int, object]]:
        """(k, ``read_one(k, urgent)``) for each shard; shard i+1 is read in a thread while
        shard i is cut into batches (the read releases the GIL)."""
        urgent = threading.Event()  # set while the stream waits: take a buffer, do not wait
        executor = ThreadPoolExecutor(1, thread_name_prefix="bombkd-shard-read")
        try:
            ahead = executor.submit(read_one, shards[0], urgent) if shards else None
            for i, k in enumerate(shards):
                urgent.set()
                shard = ahead.result()
                urgent.clear()
                if i + 1 < len(shards):
                    ahead = executor.submit(read_one, shards[i + 1], urgent)
                yield k, shard
                del shard  # let its buffers come free as soon as its batches are cut
        finally:
            urgent.set()
            executor.shutdown(wait=True, cancel_futures=True)

    def _read_pooled(self, pools: dict[str, BufferPool], k: int,
                     urgent: threading.Event) -> dict[str, ShardData]:
        """Shard k in process: a local file of large rows opened (``ShardFile``: its rows go
        from the page cache straight into the batches), else read into reused buffers
        (``BufferPool``)."""
        def buffer(name: str, nbytes: int, source) -> np.ndarray | None:
            if CAN_MAP and local_path(source) and self.row_bytes[name] >= LARGE_ROW_BYTES:
                return None
            return pools[name].take(nbytes, urgent)
        return self._read_one(k, buffer)

    def _read_one(self, k: int,
                  buffer: Callable[[str, int, object], np.ndarray | None]) -> dict[str, ShardData]:
        """Shard k of every model, each read into ``buffer(model, nbytes, source)``, or opened
        as a ``ShardFile`` where that is None: the one place a shard is opened."""
        data = {}
        for name, entry in self.entries.items():
            shard = entry.shards[k]
            source = self._source(shard)
            into = buffer(name, shard.bytes, source)
            data[name] = read_shard(source, shard, entry, labels=name == "student",
                                    classes=self.classes, policy=self.policy, buffer=into,
                                    mapped=into is None)
        _check_keys(data, {n: self._url(e.shards[k].name) for n, e in self.entries.items()})
        return data

    def _permute(self, stream, epoch: int) -> Iterator[Piece]:
        for k, data in stream:
            size = len(data["student"].keys)
            yield k, data, shard_order(self.seed, epoch, k, size)
            del data  # see _read

    def _url(self, name: str):
        return locate(str(self.root), name)

    def _source(self, shard: ShardEntry):
        """Where shard ``shard`` is read from: its URL, or its verified local copy in the shard
        cache (downloaded now if it is not there; a failed download goes to the policy)."""
        url = self._url(shard.name)
        if self.shard_cache is None:
            return url
        try:
            return self.shard_cache.fetch(url, shard)
        except ShardError:
            if not self.policy.skips:
                raise
            return url  # read_shard fails on it the same way, and records the skip

    def _pack(self, pieces: list[Piece], alloc,
              helper: ThreadPoolExecutor | None = None) -> dict:
        """One batch dict: each model's rows copied once, from the shards into memory from
        ``alloc`` (``_in_process``), in the cache dtype, by ``_gather`` (with ``helper``).

        A row is a whole sample, contiguous in the shard: one read (or one memcpy) and no
        thread pool (torch's ``index_select`` on a busy 2-core machine, and numpy's fancy
        indexing of strided rows, both ran at a fifth of a memcpy), so the loop is per sample,
        never per element."""
        if self.policy.skips:
            pieces = [(k, d, p[_present(d)[p]]) for k, d, p in pieces]
        size, b = self.manifest.shard_size, sum(len(p) for _, _, p in pieces)
        batch = {}
        for name, entry in self.entries.items():
            tensor, out = alloc((b, entry.tokens, entry.dim), DTYPES[entry.dtype])  # [B, T', D]
            _gather(out, [(d[name], i) for _, d, p in pieces for i in p.tolist()], helper)
            batch[name] = tensor
        labels = [d["student"].labels[p] for _, d, p in pieces]
        batch["label"] = torch.from_numpy(np.concatenate([np.zeros(0, np.int64)] + labels))
        index = [k * size + p for k, _, p in pieces]
        batch["index"] = torch.from_numpy(np.concatenate([np.zeros(0, np.int64)] + index))
        batch["key"] = [d["student"].keys[i] for _, d, p in pieces for i in p]
        return batch

    def empty_batch(self) -> dict:
        """A batch of no samples (a rank with fewer samples than steps under DDP)."""
        return self._pack([], functools.partial(_in_process, BufferPool(1), pin=False))


def _in_process(pool: BufferPool, shape: tuple, dtype: np.dtype, *, pin: bool) -> tuple:
    """(the batch's tensor, the numpy view to fill): pinned memory from torch's caching host
    allocator (it reuses a block once the batch using it is freed and its copies are done),
    else a buffer of ``pool``, reused once the batch that viewed it is dropped."""
    if pin:
        out = torch.empty(shape, dtype=TORCH_DTYPES[dtype.name], pin_memory=True)
        return out, out.numpy()
    nbytes = math.prod(shape) * dtype.itemsize
    view = pool.take(nbytes)[:nbytes].view(dtype).reshape(shape)
    return torch.from_numpy(view), view


def _gather(out: np.ndarray, rows: list[tuple[ShardData, int]],
            helper: ThreadPoolExecutor | None) -> None:
    """``out[r]`` = row ``i`` of shard data ``d`` for the r-th ``(d, i)``. Small rows (pooled
    features, never mapped: ``_read_pooled``) are copied in the leanest loop, at ~20 us a
    sample. Rows of ``LARGE_ROW_BYTES`` or more go through ``copy_row`` (a read from the page
    cache for a mapped shard), by this thread and ``helper``'s together: reads and numpy copies
    let go of the GIL, and on the 2-core VM one thread reading rows reached ~0.55 of a raw warm
    read, two ~0.85. Each thread takes the next row from one shared iterator, so a thread held
    up (another process on its core) delays the batch by at most the row it holds."""
    if helper is None or not rows or out[0].nbytes < LARGE_ROW_BYTES:
        for r, (data, i) in enumerate(rows):
            out[r] = data.features[i]
        return
    pairs, lock = iter(list(zip(out, rows))), threading.Lock()

    def copy() -> None:
        while True:
            with lock:  # (a GIL makes next() atomic; a free-threaded build does not)
                pair = next(pairs, None)
            if pair is None:
                return
            dst, (data, i) = pair
            data.copy_row(i, dst)

    helping = helper.submit(copy)
    copy()
    helping.result()


def _as_is(item):
    return item


def _present(data: dict[str, ShardData]) -> np.ndarray:
    return np.logical_and.reduce([d.present for d in data.values()])


def _check_keys(data: dict[str, ShardData], urls: dict[str, str]) -> None:
    """Shard k of every model must hold the same keys in the same order."""
    keys = data["student"].keys
    for name, d in data.items():
        if d.keys == keys:  # the usual case, compared in C; the loop below names the mismatch
            continue
        for pos, (a, b) in enumerate(zip(keys, d.keys)):
            if a is not None and b is not None and a != b:
                raise ShardError(urls[name], f"sample {pos} has key {b!r} but the student "
                                 f"shard {urls['student']} has {a!r}; the shard sets do not "
                                 "line up", sample=b, fix="re-run `bombkd featurize` for "
                                 f"{name}")


def _cut(stream: Iterator[Piece], units: list[Unit],
         expected: list[int]) -> Iterator[tuple[int, list[Piece]]]:
    """Cut each unit's permuted shard at its ``cuts``: (batch j, its pieces), once all
    ``expected[j]`` pieces are there (a batch that spans shards waits for the next one)."""
    waiting: dict[int, list[Piece]] = {}
    units = iter(units)
    for k, data, order in stream:  # (not zip: its reused result tuple would hold a shard)
        for j, lo, hi in next(units).cuts:
            waiting.setdefault(j, []).append((k, data, order[lo:hi]))
            if len(waiting[j]) == expected[j]:
                yield j, waiting.pop(j)
        del data  # see _read


class CachedLoader:
    """A DataLoader over ``CachedFeatureDataset`` with ``set_epoch``, ``num_batches`` and
    ``state_dict`` / ``load_state_dict``: the workers read shards, this process makes the
    batches."""

    def __init__(self, dataset: CachedFeatureDataset, *, num_workers: int, pin_memory: bool):
        dataset.check_streams()
        self.dataset, self.num_workers = dataset, num_workers
        self.manifest: Manifest = dataset.manifest
        if pin_memory and not torch.cuda.is_available():
            warnings.warn("pin_memory=True but CUDA is not available; not pinning", stacklevel=3)
            pin_memory = False
        dataset.pin_memory = pin_memory  # batches are gathered straight into pinned memory
        self._skipped: dict[int, int] = {}  # per worker, this iteration
        self._skipped_before = 0  # skipped before the start of a resumed epoch
        self.cursor = EpochCursor()  # the epoch, and where its next iteration starts
        self._slots = self._new_slots() if num_workers else None  # the persistent workers'
        self.loader = self._data_loader(persistent=True) if num_workers else None

    def _new_slots(self) -> ShardSlots:
        workers = self.num_workers
        return ShardSlots(workers, self.dataset.slots_per_worker(workers),
                          self.dataset.shard_bytes)

    def _data_loader(self, *, persistent: bool) -> DataLoader:
        """The workers only read shards; each item is one shard, in a slot. collate_fn: the
        items are final. persistent: a worker maps its slots once, not every epoch.
        worker_init_fn: workers die with this process, also when it is killed (kill -9)."""
        return DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                          collate_fn=_as_is, prefetch_factor=PREFETCH,
                          persistent_workers=persistent, worker_init_fn=DieWithParent())

    def close(self) -> None:
        """Stop the worker processes (they persist across epochs); the next iteration starts
        new ones. Safe to call twice. (Workers of a loader never closed are killed at exit.)

        The DataLoader asks its workers to stop and then terminates those that did not, with
        SIGTERM, which they ignore (``bombkd_io.workers``): any still alive after a grace
        period is killed, so neither this call nor the interpreter's exit can wait forever."""
        if self.loader is None or self.loader._iterator is None:
            return
        workers = list(getattr(self.loader._iterator, "_workers", []))
        self.loader._iterator = None  # its __del__ asks the workers to stop and joins them
        for worker in workers:
            worker.join(timeout=WORKER_GRACE_S)
            if worker.is_alive():
                worker.kill()
                worker.join()
        self._slots = self._new_slots()  # the new workers count iterations from 0
        self.loader = self._data_loader(persistent=True)

    def set_epoch(self, epoch: int) -> None:
        """Call before iterating each epoch: the batches of epoch ``epoch`` come next (from the
        loaded state's batch if ``epoch`` is the loaded state's epoch, else from the first)."""
        self.cursor.set_epoch(epoch)
        self.dataset.set_epoch(epoch)

    def state_dict(self) -> dict:
        """Where this loader stands: the epoch, its batches already yielded, the plan's inputs
        and the samples skipped so far (``bombkd_io.loaders.state``)."""
        return self.cursor.state_dict(self.dataset.plan_inputs, self.skipped)

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``: the next iteration yields its epoch's batches from its
        ``"batch"`` on, reading no shard before it; ``ConfigError`` names every difference of
        plan."""
        self.cursor.load_state_dict(state, self.dataset.plan_inputs, self.num_batches,
                                    where=f"cache {self.dataset.root}: loader state")
        self.dataset.set_epoch(self.cursor.epoch)

    def num_batches(self, epoch: int | None = None) -> int:
        """Batches this rank gets in ``epoch`` (default: the current one) before any skip."""
        return len(self.dataset.plan(self.dataset.epoch if epoch is None else epoch)[1])

    def __len__(self) -> int:
        return self.num_batches()

    def __iter__(self) -> Iterator[dict]:
        """Batches in ``epoch_batches`` order, from the cursor's start on (an empty batch where
        the plan has one)."""
        epoch, start = self.dataset.epoch, self.cursor.begin()
        self._skipped, self._skipped_before = {}, self.cursor.skipped if start else 0
        sizes = self.dataset.plan(epoch)[1]
        slots = items = received = None
        if self.num_workers:
            slots, loader = self._slots, self.loader
            if slots.busy:  # another iteration is running: workers of its own, for this one
                slots, loader = self._new_slots(), self._data_loader(persistent=False)
            slots.busy = True
            slots.begin(epoch, start)
            self.dataset.slots = slots  # what workers started now inherit
            items = iter(loader)
            track(items._workers)  # killed at exit if still alive (bombkd_io.workers)
            self.dataset.slots = self._slots
            received = self._received(items, slots, epoch, start)
        batches = self.dataset.batches(epoch, start, received)
        try:
            for j in range(start, len(sizes)):
                got, batch = next(batches) if sizes[j] else (j, self.dataset.empty_batch())
                if got != j:
                    raise RuntimeError(f"batch {got} came where the plan has batch {j}")
                self.cursor.batch = j + 1  # handed to the consumer (also when dropped below)
                # a batch whose every sample was skipped is dropped, but not under DDP: every
                # rank must take every step (its gradient all-reduce waits for all)
                if len(batch["key"]) or self.dataset.world_size > 1:
                    yield batch
        finally:
            batches.close()
            if slots is not None:
                slots.busy = False  # (a persistent worker still busy gives up: see handover)

    def _received(self, items: Iterator[dict], slots: ShardSlots, epoch: int,
                  start: int) -> Iterator[tuple[int, dict[str, ShardData]]]:
        """(k, data) of each unit the workers send, in unit order, its features viewed in the
        slots; slots nothing views any more are freed before waiting for the next one."""
        for u in range(len(self.dataset.units(epoch, start)[0])):
            slots.release()
            sent = next(items)
            if sent["unit"] != u:
                raise RuntimeError(f"unit {sent['unit']} came where the plan has unit {u}")
            worker, count = sent["skipped"]
            self._skipped[worker] = count
            yield sent["shard"], slots.shard_data(sent)

    @property
    def skipped(self) -> int:
        """Samples left out so far this epoch with ``on_error="skip"`` (all workers; a resumed
        epoch counts on from its state)."""
        now = sum(self._skipped.values()) if self.num_workers else self.dataset.policy.samples
        return self._skipped_before + now


def make_cached_loader(root: str | Path, split: str, *, models: Sequence[str] = ("student",),
                       batch_size: int = 8, seed: int = 0, num_workers: int = 1,
                       rank: int | None = None, world_size: int | None = None,
                       pin_memory: bool | None = None, on_error: str = "raise",
                       dataset: str | None = None, shard_cache: str | Path | None = None,
                       shard_cache_limit: int | None = None) -> CachedLoader:
    """The cached-mode loader: ``loader.set_epoch(e)``, then iterate batch dicts.

    ``root`` is the cache folder (or URL) holding ``{dataset}-{split}.index.json`` (``dataset``:
    needed only where it holds several); ``models``: ``"student"`` plus any teachers to batch
    with it. Each batch is ``{"student": [B, T', D] in the cache's dtype, "label": int64 [B],
    "key": [str], "index": int64 [B]}`` plus one tensor per teacher: cast on the device
    (``.to(device).float()``). ``pin_memory`` defaults to ``torch.cuda.is_available()``;
    ``rank``/``world_size`` default to torch.distributed's when it is initialised. ``on_error``:
    ``"raise"`` on a bad shard or sample, or ``"skip"`` it with a warning (``loader.skipped``).
    A remote ``root`` (``s3://``, ``gs://``, ``az://``, ``https://``, ``hf://``: see
    ``bombkd_io.storage``) is streamed; ``shard_cache`` (a local folder) keeps its shards for
    later epochs, verified once, at most ``shard_cache_limit`` bytes (least recently used out).
    """
    cache = ShardCache(shard_cache, shard_cache_limit) if shard_cache is not None else None
    ds = CachedFeatureDataset(root, split, models=models, batch_size=batch_size, seed=seed,
                              dataset=dataset, rank=rank, world_size=world_size,
                              on_error=on_error, shard_cache=cache)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return CachedLoader(ds, num_workers=num_workers, pin_memory=pin_memory)
