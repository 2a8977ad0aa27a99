"""Shards from loader workers into the loader's process, over shared memory made once.

A worker only reads: it reads a shard of every model into a slot of ``ShardSlots`` (shared
buffers the loader's process made before the workers started, as large as the models' largest
shards, two per worker unless a batch spans more shards than that: ``slots_per_worker``),
parses it there and sends the slot's number with the shard's keys, labels and where its
features lie (``sent``); the loader's process views the features in its own mapping of the
slot (``shard_data``: no copy, no new mapping) and cuts and gathers the batches there, as it
does in process. It marks a slot free again once nothing views it (``release``); a worker
waits for a free slot of its own row, so a slot is never written while its shard is in use. A
worker's memory is its slots, whatever the sample size; the loader's process maps only the
slots it is cutting (``unmap`` once freed).

The workers persist across epochs, so each maps its slots once (``populate``: in one call
where the kernel can): a worker started per epoch paid a page fault per 4 KiB of its two shards
every epoch, half the time of an epoch of token-level features. Each iteration has a tag
(``begin``), and the worker's iterator for the DataLoader's ``i``-th iteration reads that
iteration's (epoch, start, tag) from row ``i`` of a shared table, never the newest row: a
worker started late, or one of an ended iteration still waiting for a slot, works under an old
tag; it gives up waiting, and the next iteration frees every slot an old tag holds.

A shard whose features are not a view of its slot (an irregular shard decoded sample by
sample, one left out on error) sends its arrays through the pipe instead.
"""
from __future__ import annotations

import ctypes
import sys
import time

import numpy as np
import torch

from bombkd_io.shards.reader import ShardData

MADV_POPULATE_WRITE = 23  # Linux >= 5.14: map every page of a range, writable, in one call
MADV_DONTNEED = 4
PAGE = 4096
POLL_S = 0.001
ROWS = 64  # iterations remembered for workers that start late


def _shared(nbytes: int) -> torch.Tensor:
    """Shared memory, its pages untouched (``share_memory_`` would copy a fresh tensor in)."""
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(nbytes))


def _madvise(buffer: np.ndarray, advice: int) -> None:
    """``madvise`` over ``buffer``'s pages; a no-op where libc or the advice is missing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        start = buffer.ctypes.data // PAGE * PAGE
        libc.madvise(ctypes.c_void_p(start),
                     ctypes.c_size_t(buffer.ctypes.data + buffer.nbytes - start), advice)
    except (OSError, AttributeError):
        pass


def populate(buffer: np.ndarray) -> None:
    """Map every page of ``buffer`` in one call (where the kernel offers it), not one fault per
    page on first write."""
    _madvise(buffer, MADV_POPULATE_WRITE)


def unmap(buffer: np.ndarray) -> None:
    """Drop ``buffer``'s pages from this process's mapping (the shared memory keeps them): a
    process that only reads a slot maps it again cheaply (read faults map 16 pages at a time),
    and its RSS holds the slots in use, not all of them."""
    _madvise(buffer, MADV_DONTNEED)


class ShardSlots:
    """``slots`` shared buffers per worker and model (``nbytes``: each model's largest shard),
    and a shared table of the taken ones; made in the loader's process before the workers
    start (they inherit them, or receive them pickled as file descriptors)."""

    def __init__(self, workers: int, slots: int, nbytes: dict[str, int]):
        self.buffers = [[{m: _shared(n) for m, n in nbytes.items()} for _ in range(slots)]
                        for _ in range(workers)]
        # per slot: 0 free, else the tag of the iteration whose worker took it
        self.taken = torch.zeros((workers, slots), dtype=torch.int64).share_memory_()
        self.tag = torch.zeros(1, dtype=torch.int64).share_memory_()  # the iteration's, >= 1
        # row i % ROWS: (epoch, start, tag) of the DataLoader's i-th iteration
        self.iterations = torch.zeros((ROWS, 3), dtype=torch.int64).share_memory_()
        self.begun = 0  # iterations begun (in the loader's process)
        self.handed: set[tuple[int, int]] = set()  # slots whose shard this process viewed
        self.busy = False  # one iteration at a time: a second one makes its own slots
        self._arrays: dict | None = None  # this process's numpy views, made on first use

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def arrays(self, worker: int, slot: int) -> dict[str, np.ndarray]:
        """The slot's buffers as numpy arrays of this process (the same objects every time, so
        their reference counts say whether anything views them)."""
        if self._arrays is None:
            self._arrays = {(w, s): {m: t.numpy() for m, t in row[s].items()}
                            for w, row in enumerate(self.buffers) for s in range(len(row))}
        return self._arrays[worker, slot]

    # ---- in the loader's process

    def begin(self, epoch: int, start: int) -> None:
        """Before an iteration asks its workers for shards: its epoch and start batch, a new
        tag (a worker still waiting for the last iteration gives up), and nothing of the last
        one handed out."""
        self.tag += 1
        self.iterations[self.begun % ROWS] = torch.tensor([epoch, start, int(self.tag)])
        self.begun += 1
        self.handed.clear()

    def iteration(self, i: int) -> tuple[int, int, int]:
        """(epoch, start, tag) of the DataLoader's ``i``-th iteration (counted in a worker);
        tag 0 when that row has been reused since (the iteration is long over)."""
        epoch, start, tag = (int(x) for x in self.iterations[i % ROWS])
        return epoch, start, tag if tag == i + 1 else 0

    def release(self) -> None:
        """Mark free the slots this process received whose buffers nothing views any more (a
        slot taken but not received yet holds a shard on its way), and those an ended
        iteration's workers took (their workers have moved on: see ``begin``)."""
        taken = self.taken.numpy()
        taken[(taken != 0) & (taken != int(self.tag))] = 0
        for w, s in list(self.handed):
            # references: the dict's, the loop's and getrefcount's own; more are views
            if all(sys.getrefcount(a) <= 3 for a in self.arrays(w, s).values()):
                for buffer in self.arrays(w, s).values():
                    unmap(buffer)
                self.handed.discard((w, s))
                self.taken[w, s] = 0

    def shard_data(self, sent: dict) -> dict[str, ShardData]:
        """The shard a worker sent (``sent``), its features viewed in this process's mapping."""
        self.handed.add(tuple(sent["slot"]))
        out = {}
        for name, d in sent["models"].items():
            features = d["features"]
            if isinstance(features, tuple):  # (offset, shape, strides, dtype) in the slot
                offset, shape, strides, dtype = features
                base = self.arrays(*sent["slot"])[name]
                features = np.ndarray(shape, dtype, buffer=base, offset=offset, strides=strides)
            out[name] = ShardData(d["keys"], features, d["labels"], d["present"])
        return out

    # ---- in a worker

    def take(self, worker: int, tag: int) -> tuple[int, dict[str, np.ndarray]]:
        """A free slot of ``worker``'s row, now marked taken by iteration ``tag``, and its
        buffers (waits for the loader's process to free one; ``RuntimeError`` once another
        iteration has begun)."""
        row = self.taken[worker].numpy()
        while not (free := np.flatnonzero(row == 0)).size:
            if int(self.tag) != tag:
                raise RuntimeError("the loader's iteration ended while this worker waited")
            time.sleep(POLL_S)
        row[free[0]] = tag
        buffers = self.arrays(worker, int(free[0]))
        return int(free[0]), buffers

    def sent(self, worker: int, slot: int, data: dict[str, ShardData]) -> dict:
        """What crosses to the loader's process for a shard read into ``slot``: its keys,
        labels and presence, and its features as a place in the slot (or, when they are not a
        view of it, the array itself)."""
        models = {}
        for name, d in data.items():
            base = self.arrays(worker, slot)[name]
            offset = d.features.ctypes.data - base.ctypes.data
            inside = 0 <= offset and offset + _span(d.features) <= base.nbytes
            where = (offset, d.features.shape, d.features.strides, d.features.dtype)
            models[name] = {"keys": d.keys, "labels": d.labels, "present": d.present,
                            "features": where if inside and d.features.size else d.features}
        return {"slot": (worker, slot), "models": models}


def _span(a: np.ndarray) -> int:
    """Bytes from the first to past the last element of ``a`` (a view with positive strides)."""
    if not a.size:
        return 0
    return sum((n - 1) * s for n, s in zip(a.shape, a.strides)) + a.itemsize
