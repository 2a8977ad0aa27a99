"""Cached mode: stream feature shards into training batches, in the order of ``epoch_batches``.

Worker ``w`` of rank ``r`` reads the shards ``stream_plan`` gives its stream, permutes each shard
with ``shard_order`` and cuts the stream into the batch sizes of that plan, so the batches equal
``bombkd_io.sampling.epoch_batches`` exactly (and so equal the video loader's). Each byte is
copied twice: read into a reused shard buffer (the next shard is read in a thread while batches
are cut from this one), then one gather per model and batch into the batch tensor. Batches keep
the cache's dtype: the consumer casts on its device (``.to(device).float()``), which halves host
memory traffic and PCIe bytes for fp16 caches and changes no value. From a worker, small
batches cross as bytes in the pipe, in groups (the DataLoader runs with ``batch_size=None`` and
only carries them); large ones are gathered into a slot of a ring of shared buffers the loader
made once per worker, and only the slot's number crosses; the loader frees a slot when no
tensor views its batch any more, and a worker with no free slot sends fresh shared memory
(``bombkd_io.loaders.handover``). Memory is bounded by two shards per model, plus the ring in
workers, whatever the split's size. Workers die with the process that iterates the loader,
also when it is killed (``bombkd_io.workers``).
"""
from __future__ import annotations

import functools
import math
import threading
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bombkd_io.errors import ConfigError, DatasetError, ErrorPolicy, ShardError
from bombkd_io.loaders.handover import TORCH_DTYPES, BatchRing, WorkerAlloc, received, ring_bytes
from bombkd_io.names import is_url, locate
from bombkd_io.sampling import check_streams, shard_order, stream_plan
from bombkd_io.shards.codec import DTYPES
from bombkd_io.shards.cache import ShardCache
from bombkd_io.shards.manifest import Manifest, ShardEntry, load_manifest, manifest_path
from bombkd_io.shards.reader import BufferPool, ShardData, read_shard
from bombkd_io.storage import check_root, is_remote
from bombkd_io.workers import DieWithParent

GROUP = 8  # batches per worker-to-loader transfer: amortises the DataLoader's per-item cost
GROUP_BYTES = 4 << 20  # ... but a group of more than one batch holds at most this many bytes
RING_SLOTS = 3  # ring slots per worker beyond the DataLoader's prefetch_factor (see handover)


BATCH_BUFFERS = 4  # reused batch buffers in process (more are allocated while batches are held)
Piece = tuple[int, dict[str, ShardData], np.ndarray]  # (shard k, data per model, positions)


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

    def check_streams(self, num_workers: int) -> None:
        """Refuse, naming the cache, a split with fewer shards than ranks x ``num_workers``."""
        check_streams(self.num_shards, self.world_size, num_workers, where=f"cache {self.root}")

    def plan(self, epoch: int, worker: int, num_workers: int) -> tuple[list[int], list[int]]:
        """(shards this (rank, worker) stream reads, in order; its batch sizes): ``stream_plan``.

        The manifest's shard counts are those of ``shard_ranges(count, shard_size)``, as
        ``stream_plan`` assumes: ``check_manifest`` refuses any other when it is read.
        """
        return stream_plan(self.seed, epoch, self.manifest.count, self.manifest.shard_size,
                           self.batch_size, rank=self.rank, world_size=self.world_size,
                           worker=worker, num_workers=num_workers)

    @property
    def model_batch_bytes(self) -> list[int]:
        """Feature bytes of a full batch, per model."""
        return [self.batch_size * e.tokens * e.dim * DTYPES[e.dtype].itemsize
                for e in self.entries.values()]

    @property
    def batch_bytes(self) -> int:
        """Feature bytes of a full batch, all models."""
        return sum(self.model_batch_bytes)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        shards, sizes = self.plan(self.epoch, worker, num_workers)
        self.policy, self.worker = self.policy.fresh(), worker  # per epoch
        batch_pool = self._pools.setdefault("", BufferPool(BATCH_BUFFERS))  # "": the batches
        alloc = (functools.partial(WorkerAlloc, self.ring, worker) if info else  # per batch
                 lambda: functools.partial(_in_process, batch_pool, pin=self.pin_memory))
        stream = self._read(shards)              # (k, {model: ShardData}) per shard, one ahead
        stream = self._permute(stream)           # (k, data, positions in shard_order)
        batches = _cut(stream, sizes)            # [(k, data, positions), ...] per batch
        packed = (self._pack(b, alloc) for b in batches)  # gathered (None: all skipped)
        if self.group:
            return _groups(packed, self.group)   # lists of `group` packed batches
        return (self.unpack(p) for p in packed if p is not None)  # batch dicts

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
        data = {name: read_shard(self._source(entry.shards[k]), entry.shards[k], entry,
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

    def _pack(self, pieces: list[Piece], alloc) -> dict | None:
        """One batch: each model's rows copied once, from the shard buffers into memory from
        ``alloc()`` (``_in_process``, ``handover.WorkerAlloc``), in the cache dtype.

        A row is a whole sample, contiguous in the shard: numpy copies it with one memcpy and no
        thread pool (torch's ``index_select`` on a busy 2-core machine, and numpy's fancy
        indexing of strided rows, both ran at a fifth of this), so the loop is per sample,
        never per element."""
        if self.policy.skips:
            pieces = [(k, d, p[_present(d)[p]]) for k, d, p in pieces]
        if sum(len(p) for _, _, p in pieces) == 0 and self.world_size == 1:
            return None  # every sample of the batch was skipped (on_error="skip")
        # Under DDP an empty batch still goes through: every rank must take every step.
        size, b = self.manifest.shard_size, sum(len(p) for _, _, p in pieces)
        features, alloc = {}, alloc()
        for name, entry in self.entries.items():
            sent, out = alloc((b, entry.tokens, entry.dim), DTYPES[entry.dtype])  # [B, T', D]
            rows = (d[name].features[i] for _, d, p in pieces for i in p.tolist())
            for j, row in enumerate(rows):
                out[j] = row
            features[name] = sent
        return {
            "features": features,
            "label": np.concatenate([np.zeros(0, np.int64)] +
                                    [d["student"].labels[p] for _, d, p in pieces]),
            "index": np.concatenate([np.zeros(0, np.int64)] + [k * size + p for k, _, p in pieces]),
            "key": [d["student"].keys[i] for _, d, p in pieces for i in p],
            "skipped": (self.worker, self.policy.samples)}  # this worker's count so far

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


def _cut(stream: Iterator[Piece], sizes: list[int]) -> Iterator[list[Piece]]:
    """Cut the stream of permuted shards into batches of ``sizes`` (batches may span shards;
    a size of 0 gives an empty batch, see ``batch_sizes``)."""
    wanted = iter(sizes)
    need, pieces = next(wanted, None), []
    while need == 0:
        yield []
        need = next(wanted, None)
    for k, data, order in stream:
        start = 0
        while start < len(order) and need is not None:
            take = min(need, len(order) - start)
            pieces.append((k, data, order[start:start + take]))
            start, need = start + take, need - take
            while need == 0:
                yield pieces
                need, pieces = next(wanted, None), []
        if need is None:
            return


class CachedLoader:
    """A DataLoader over ``CachedFeatureDataset`` with ``set_epoch`` and ``num_batches``."""

    def __init__(self, dataset: CachedFeatureDataset, *, num_workers: int, pin_memory: bool):
        dataset.check_streams(num_workers)
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
        self._skipped: dict[int, int] = {}
        self._ring: BatchRing | None = None  # made at the first iteration with workers
        # Batches are made whole in the workers; the DataLoader only carries them.
        # collate_fn: the packed groups are final; DataLoader's default conversion would walk
        # every key string of every batch (a third of the in-process loader's time)
        # worker_init_fn: workers die with this process, also when it is killed (kill -9)
        self.loader = DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                 collate_fn=_as_is, prefetch_factor=2 if num_workers else None,
                                 worker_init_fn=DieWithParent() if num_workers else None)

    def set_epoch(self, epoch: int) -> None:
        """Call before iterating each epoch: the batches of epoch ``epoch`` come next."""
        self.dataset.set_epoch(epoch)

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
        return sum(self._planned(self.dataset.epoch if epoch is None else epoch))

    def _planned(self, epoch: int) -> list[int]:
        """How many batches each worker's stream yields in ``epoch``."""
        workers = max(1, self.num_workers)  # DataLoader's 0 (in-process) is one stream
        return [len(self.dataset.plan(epoch, w, workers)[1]) for w in range(workers)]

    def __len__(self) -> int:
        return self.num_batches()

    def __iter__(self) -> Iterator[dict]:
        """Batches in ``epoch_batches`` order: batch j of each worker in turn.

        Each worker sends its batches in groups of ``G = dataset.group`` (one transfer per
        group), and the DataLoader delivers the groups round-robin over the workers that still
        have batches; group r of every worker holds batches [r*G, (r+1)*G) of its stream, so
        taking batch j of each group in turn restores the one-batch round-robin order.
        """
        self._skipped = {}
        planned = self._planned(self.dataset.epoch)
        ring = self.dataset.ring = self._take_ring()  # the workers started below inherit it
        groups = iter(self.loader)
        group = self.dataset.group
        try:
            for r in range(-(-max(planned) // group)):
                round_ = [next(groups) for n in planned if n > r * group]
                for j in range(group):
                    for packed in (g[j] for g in round_ if j < len(g) and g[j] is not None):
                        worker, count = packed["skipped"]
                        self._skipped[worker] = count
                        if ring is not None:
                            ring.release()  # slots of the batches the consumer dropped
                        yield self.unpack(packed, ring=ring)  # tensors, in this process
        finally:
            del groups  # its workers are stopped and joined: none writes into the ring now
            if ring is not None:
                ring.busy = False

    @property
    def skipped(self) -> int:
        """Samples left out so far this epoch with ``on_error="skip"`` (all workers)."""
        return sum(self._skipped.values())


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
