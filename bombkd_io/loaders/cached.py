"""Cached mode: stream feature shards into training batches, in the order of ``epoch_batches``.

A rank reads the shards ``stream_plan`` gives it, permutes each with ``shard_order`` and cuts
the stream into the plan's batch sizes, so the batches equal ``bombkd_io.sampling.epoch_batches``
exactly (and so equal the video loader's), whatever the number of workers. The stream's shards
are units of work (``plan_units``): in process they are read in turn; with ``W`` workers, unit
``u`` goes to worker ``u % W``, which cuts the batches that lie inside its shard and sends the
parts of those that straddle a shard boundary as pieces tagged with their batch index. The
loader's process puts the batches back in plan order (early ones wait in a buffer, at most a
shard's batches per worker) and joins the pieces of a straddling batch (one more copy of those
few). A loaded state (``state_dict``) starts the stream at its batch: shards before it are not
read, the positions of its shard before it are not gathered.

Each byte is copied twice: read into a reused shard buffer (the next shard is read in a thread
while batches are cut from this one), then one gather per model and batch into the batch
tensor. Batches keep
the cache's dtype: the consumer casts on its device (``.to(device).float()``), which halves host
memory traffic and PCIe bytes for fp16 caches and changes no value. From a worker, small
batches cross as bytes in the pipe, in groups (the DataLoader runs with ``batch_size=None`` and
only carries them); large ones are gathered into a slot of a ring of shared buffers the loader
made once per worker, and only the slot's number crosses; the loader frees a slot when no
tensor views its batch any more, and a worker with no free slot sends fresh shared memory
(``bombkd_io.loaders.handover``). Memory is bounded by two shards per model, plus the ring in
workers and the early batches waiting in the loader's process, whatever the split's size.
Workers die with the process that iterates the loader, also when it is killed
(``bombkd_io.workers``).
"""
from __future__ import annotations

import functools
import math
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import NamedTuple
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bombkd_io.errors import ConfigError, DatasetError, ErrorPolicy, ShardError
from bombkd_io.loaders.handover import TORCH_DTYPES, BatchRing, WorkerAlloc, received, ring_bytes
from bombkd_io.names import locate
from bombkd_io.loaders.state import EpochCursor
from bombkd_io.sampling import check_streams, plan_inputs, shard_order, shard_ranges, stream_plan
from bombkd_io.shards.codec import DTYPES
from bombkd_io.shards.manifest import Manifest, load_manifest, manifest_path
from bombkd_io.shards.reader import BufferPool, ShardData, read_shard
from bombkd_io.workers import DieWithParent

GROUP = 8  # batches per worker-to-loader transfer: amortises the DataLoader's per-item cost
GROUP_BYTES = 4 << 20  # ... but a group of more than one batch holds at most this many bytes
RING_SLOTS = 3  # ring slots per worker beyond the DataLoader's prefetch_factor (see handover)


BATCH_BUFFERS = 4  # reused batch buffers in process (more are allocated while batches are held)
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
    """Yields ready batches ``{"student": [B,T',D] in the cache dtype, "label": int64 [B],
    "key": [str], "index": int64 [B]}`` (+ one entry per teacher in ``models``) from a
    format-1 cache."""

    def __init__(self, root: str | Path, split: str, *, models: Sequence[str] = ("student",),
                 batch_size: int = 8, seed: int = 0, dataset: str | None = None,
                 rank: int | None = None, world_size: int | None = None,
                 on_error: str = "raise"):
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
        self.root, self.manifest = Path(root), load_manifest(root, split, dataset)
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
        self.policy, self.worker = policy, 0  # raise or skip, and what this epoch left out
        self.group = 0  # > 0: yield lists of `group` packed batches, the loader unpacks them
        self.pin_memory = False  # in process: gather straight into pinned memory
        self._pools: dict[str, BufferPool] = {}  # reused across epochs (fresh pages are slow)
        self.ring: BatchRing | None = None  # large batches from workers (``CachedLoader``)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pools": {}}  # a worker started by spawn makes its own

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
    def model_batch_bytes(self) -> list[int]:
        """Feature bytes of a full batch, per model."""
        return [self.batch_size * e.tokens * e.dim * DTYPES[e.dtype].itemsize
                for e in self.entries.values()]

    @property
    def batch_bytes(self) -> int:
        """Feature bytes of a full batch, all models."""
        return sum(self.model_batch_bytes)

    def __iter__(self) -> Iterator[list[dict]]:
        """Lists of packed batches (``_pack``), each tagged with its batch index ``"batch"``: in
        process, whole batches in plan order; in worker ``w`` of ``W``, the parts of batches in
        units ``w, w + W, ...`` (``CachedLoader`` puts them in order and joins them)."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        units, sizes = self.units(self.epoch, self.start)
        expected = pieces_per_batch(units, sizes) if not info else None  # in process: join here
        units = list(enumerate(units))[worker::num_workers]  # (u, unit): unit u, worker u % W
        self.policy, self.worker = self.policy.fresh(), worker  # per epoch
        batch_pool = self._pools.setdefault("", BufferPool(BATCH_BUFFERS))  # "": the batches
        alloc = (functools.partial(WorkerAlloc, self.ring, worker) if info else  # per batch
                 lambda: functools.partial(_in_process, batch_pool, pin=self.pin_memory))
        stream = self._read([u.shard for _, u in units])  # (k, {model: ShardData}), one ahead
        stream = self._permute(stream)           # (k, data, positions in shard_order)
        parts = _cut(stream, units, expected)    # (batch j, unit u, [(k, data, positions), ...])
        packed = (self._pack(j, u, p, alloc) for j, u, p in parts)  # gathered, tagged j and u
        return _groups(packed, max(1, self.group))  # lists of `group` packed batches

    def _read(self, shards: list[int]) -> Iterator[tuple[int, dict[str, ShardData]]]:
        """Each shard read whole; shard i+1 is read in a thread while shard i is cut into
        batches (the read releases the GIL), into a reused buffer (``BufferPool``)."""
        pools = {name: self._pools.setdefault(name, BufferPool()) for name in self.entries}
        urgent = threading.Event()  # set while the stream waits: take a buffer, do not wait
        executor = ThreadPoolExecutor(1, thread_name_prefix="bombkd-shard-read")
        try:
            ahead = executor.submit(self._read_one, shards[0], pools, urgent) if shards else None
            for i, k in enumerate(shards):
                urgent.set()
                shard = ahead.result()
                urgent.clear()
                if i + 1 < len(shards):
                    ahead = executor.submit(self._read_one, shards[i + 1], pools, urgent)
                yield k, shard
                del shard  # let its buffers come free as soon as its batches are cut
        finally:
            urgent.set()
            executor.shutdown(wait=True, cancel_futures=True)

    def _read_one(self, k: int, pools: dict[str, BufferPool],
                  urgent: threading.Event) -> dict[str, ShardData]:
        data = {name: read_shard(self._url(entry.shards[k].name), entry.shards[k], entry,
                                 labels=name == "student", classes=self.classes,
                                 policy=self.policy,
                                 buffer=pools[name].take(entry.shards[k].bytes, urgent))
                for name, entry in self.entries.items()}
        _check_keys(data, {n: self._url(e.shards[k].name) for n, e in self.entries.items()})
        return data

    def _permute(self, stream) -> Iterator[Piece]:
        for k, data in stream:
            size = len(data["student"].keys)
            yield k, data, shard_order(self.seed, self.epoch, k, size)
            del data  # see _read

    def _url(self, name: str):
        return locate(str(self.root), name)

    def _pack(self, j: int, u: int, pieces: list[Piece], alloc) -> dict:
        """Batch ``j`` (or its part in unit ``u``): each model's rows copied once, from the shard
        buffers into memory from ``alloc()`` (``_in_process``, ``handover.WorkerAlloc``), in the
        cache dtype.

        A row is a whole sample, contiguous in the shard: numpy copies it with one memcpy and no
        thread pool (torch's ``index_select`` on a busy 2-core machine, and numpy's fancy
        indexing of strided rows, both ran at a fifth of this), so the loop is per sample,
        never per element."""
        if self.policy.skips:
            pieces = [(k, d, p[_present(d)[p]]) for k, d, p in pieces]
        size, b = self.manifest.shard_size, sum(len(p) for _, _, p in pieces)
        features, alloc = {}, alloc()
        for name, entry in self.entries.items():
            sent, out = alloc((b, entry.tokens, entry.dim), DTYPES[entry.dtype])  # [B, T', D]
            rows = (d[name].features[i] for _, d, p in pieces for i in p.tolist())
            for r, row in enumerate(rows):
                out[r] = row
            features[name] = sent
        return {
            "batch": j,
            "unit": u,
            "features": features,
            "label": np.concatenate([np.zeros(0, np.int64)] +
                                    [d["student"].labels[p] for _, d, p in pieces]),
            "index": np.concatenate([np.zeros(0, np.int64)] + [k * size + p for k, _, p in pieces]),
            "key": [d["student"].keys[i] for _, d, p in pieces for i in p],
            "skipped": (self.worker, self.policy.samples)}  # this worker's count so far

    def empty_batch(self) -> dict:
        """A batch of no samples (a rank with fewer samples than steps under DDP)."""
        return self.unpack(self._pack(-1, -1, [], lambda: functools.partial(
            _in_process, BufferPool(1), pin=False)))

    def unpack(self, packed: dict, pin_memory: bool = False,
               ring: BatchRing | None = None) -> dict:
        """The batch dict of a packed batch: features ``[B, T', D]`` in the cache dtype (copied
        into pinned memory if asked and not there yet), labels and indices int64. ``ring``: the
        one the batch's worker wrote into."""
        b = len(packed["key"])
        batch = {}
        for name, entry in self.entries.items():
            dtype = TORCH_DTYPES[entry.dtype]
            nbytes = b * entry.tokens * entry.dim * dtype.itemsize
            rows = received(packed["features"][name], nbytes, dtype, ring)
            rows = rows.view(b, entry.tokens, entry.dim)  # [B, T', D]
            if pin_memory and not rows.is_pinned():
                rows = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True).copy_(rows)
            batch[name] = rows
        batch["label"] = torch.from_numpy(packed["label"])
        batch["index"] = torch.from_numpy(packed["index"])
        batch["key"] = packed["key"]
        return batch


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


def _as_is(item):
    return item


def _groups(items: Iterator, size: int) -> Iterator[list]:
    """Consecutive items in lists of ``size`` (the last may be shorter)."""
    group = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


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


def _cut(stream: Iterator[Piece], units: list[tuple[int, Unit]],
         expected: list[int] | None) -> Iterator[tuple[int, int, list[Piece]]]:
    """Cut each unit's permuted shard at its ``cuts``: (batch j, unit u, its pieces). With
    ``expected`` (pieces per batch), the pieces of a batch that spans shards are yielded
    together (u: the first unit's), once all are there; without, each piece alone."""
    waiting: dict[int, list[Piece]] = {}
    for (u, unit), (k, data, order) in zip(units, stream):
        for j, lo, hi in unit.cuts:
            piece = (k, data, order[lo:hi])
            if expected is None:
                yield j, u, [piece]
                continue
            waiting.setdefault(j, []).append(piece)
            if len(waiting[j]) == expected[j]:
                yield j, u, waiting.pop(j)
        del data  # see _read


class CachedLoader:
    """A DataLoader over ``CachedFeatureDataset`` with ``set_epoch`` and ``num_batches``."""

    def __init__(self, dataset: CachedFeatureDataset, *, num_workers: int, pin_memory: bool):
        dataset.check_streams()
        # batches per transfer: many small ones, one large one (each waits in the queue)
        dataset.group = max(1, min(GROUP, GROUP_BYTES // max(1, dataset.batch_bytes)))
        self.dataset, self.num_workers = dataset, num_workers
        self.manifest: Manifest = dataset.manifest
        if pin_memory and not torch.cuda.is_available():
            warnings.warn("pin_memory=True but CUDA is not available; not pinning", stacklevel=3)
            pin_memory = False
        # in process, batches are gathered straight into pinned memory; from workers, copied
        dataset.pin_memory = pin_memory and not num_workers
        self.unpack = functools.partial(dataset.unpack, pin_memory=pin_memory)
        self.pin_memory = pin_memory
        self._skipped_before = 0  # skipped before the start of a resumed epoch
        self._skipped: dict[int, int] = {}  # per worker, this iteration
        self.cursor = EpochCursor()  # the epoch, and where its next iteration starts
        self._ring: BatchRing | None = None  # made at the first iteration with workers
        # Batches are made whole in the workers; the DataLoader only carries them.
        # collate_fn: the packed groups are final; DataLoader's default conversion would walk
        # every key string of every batch (a third of the in-process loader's time)
        # worker_init_fn: workers die with this process, also when it is killed (kill -9)
        self.loader = DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                 collate_fn=_as_is, prefetch_factor=2 if num_workers else None,
                                 worker_init_fn=DieWithParent() if num_workers else None)

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
        self.cursor.load_state_dict(state, self.dataset.plan_inputs,
                                    where=f"cache {self.dataset.root}: loader state")
        self.dataset.set_epoch(self.cursor.epoch)
        if self.cursor.start > self.num_batches(self.cursor.epoch):
            raise ConfigError(f"cache {self.dataset.root}: loader state: batch "
                              f"{self.cursor.start} is past the "
                              f"{self.num_batches(self.cursor.epoch)} batches of epoch "
                              f"{self.cursor.epoch}")

    def _take_ring(self) -> BatchRing | None:
        """The ring this iteration's workers write large batches into (``handover``): made
        once, with ``prefetch_factor + RING_SLOTS`` slots per worker (those in the queue, the
        one being gathered, the one the consumer holds and the one before it); None in
        process, when no model's batch is large, and while another iteration uses it."""
        nbytes = ring_bytes(self.dataset.model_batch_bytes)
        if not self.num_workers or not nbytes:
            return None
        if self._ring is None:
            slots = self.loader.prefetch_factor + RING_SLOTS
            self._ring = BatchRing(self.num_workers, slots, nbytes)
        if self._ring.busy:
            return None
        self._ring.busy = True
        self._ring.start()
        return self._ring

    def num_batches(self, epoch: int | None = None) -> int:
        """Batches this rank gets in ``epoch`` (default: the current one) before any skip."""
        return len(self.dataset.plan(self.dataset.epoch if epoch is None else epoch)[1])

    def __len__(self) -> int:
        return self.num_batches()

    def __iter__(self) -> Iterator[dict]:
        """Batches in ``epoch_batches`` order, from the cursor's start on.

        The DataLoader delivers the workers' groups round-robin; each packed batch or part
        names its batch, so the parts are gathered per batch (early ones wait) and a batch is
        yielded, its parts joined, once all are there and all before it are out.
        """
        start = self.dataset.start = self.cursor.begin()
        self._skipped, self._skipped_before = {}, self.cursor.skipped if start else 0
        units, sizes = self.dataset.units(self.dataset.epoch, start)
        expected = pieces_per_batch(units, sizes) if self.num_workers else [
            int(n > 0) for n in pieces_per_batch(units, sizes)]
        ring = self.dataset.ring = self._take_ring()  # the workers started below inherit it
        groups = iter(self.loader)
        waiting: dict[int, list[dict]] = {}
        try:
            for j in range(start, len(sizes)):
                while len(waiting.get(j, ())) < expected[j]:
                    for packed in next(groups):
                        worker, count = packed["skipped"]
                        self._skipped[worker] = count
                        waiting.setdefault(packed["batch"], []).append(packed)
                if ring is not None:
                    ring.release()  # slots of the batches the consumer dropped
                parts = sorted(waiting.pop(j, ()), key=lambda p: p["unit"])  # stream order
                parts = [self.unpack(p, ring=ring) for p in parts]
                batch = _join(parts, self.dataset.empty_batch, self.pin_memory)
                self.cursor.batch = j + 1  # handed to the consumer (also when dropped below)
                # a batch whose every sample was skipped is dropped, but not under DDP: every
                # rank must take every step (its gradient all-reduce waits for all)
                if len(batch["key"]) or self.dataset.world_size > 1:
                    yield batch
        finally:
            del groups  # its workers are stopped and joined: none writes into the ring now
            if ring is not None:
                ring.busy = False

    @property
    def skipped(self) -> int:
        """Samples left out so far this epoch with ``on_error="skip"`` (all workers; a resumed
        epoch counts on from its state)."""
        return self._skipped_before + sum(self._skipped.values())


def _join(parts: list[dict], empty, pin_memory: bool) -> dict:
    """One batch dict of the parts of a batch, in order: the part itself when it is the only
    one; ``empty()`` when there is none; else each tensor concatenated (into pinned memory if
    asked)."""
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return empty()
    batch = {"key": [key for p in parts for key in p["key"]]}
    for name in (n for n in parts[0] if n != "key"):
        tensors = [p[name] for p in parts]
        shape = (sum(len(t) for t in tensors), *tensors[0].shape[1:])
        out = torch.empty(shape, dtype=tensors[0].dtype, pin_memory=pin_memory)
        batch[name] = torch.cat(tensors, out=out)
    return batch


def make_cached_loader(root: str | Path, split: str, *, models: Sequence[str] = ("student",),
                       batch_size: int = 8, seed: int = 0, num_workers: int = 1,
                       rank: int | None = None, world_size: int | None = None,
                       pin_memory: bool | None = None, on_error: str = "raise",
                       dataset: str | None = None) -> CachedLoader:
    """The cached-mode loader: ``loader.set_epoch(e)``, then iterate batch dicts.

    ``root`` is the cache folder (or URL) holding ``{dataset}-{split}.index.json`` (``dataset``:
    needed only where it holds several); ``models``: ``"student"`` plus any teachers to batch
    with it. Each batch is ``{"student": [B, T', D] in the cache's dtype, "label": int64 [B],
    "key": [str], "index": int64 [B]}`` plus one tensor per teacher: cast on the device
    (``.to(device).float()``). ``pin_memory`` defaults to ``torch.cuda.is_available()``;
    ``rank``/``world_size`` default to torch.distributed's when it is initialised. ``on_error``:
    ``"raise"`` on a bad shard or sample, or ``"skip"`` it with a warning (``loader.skipped``).
    """
    ds = CachedFeatureDataset(root, split, models=models, batch_size=batch_size, seed=seed,
                              dataset=dataset, rank=rank, world_size=world_size,
                              on_error=on_error)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return CachedLoader(ds, num_workers=num_workers, pin_memory=pin_memory)
