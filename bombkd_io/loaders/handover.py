"""Worker batches into the loader's process: small ones as bytes in the pipe, large ones in a
``BatchRing`` of reused shared memory (fresh shared memory when none is free).

Gathering a large batch into fresh shared memory costs a page fault per page in the worker, a
copy (``share_memory_``) and a page fault per page again in the loader's process: at 6.5 MB a
sample that made 2 workers slower than one process. So the loader's process makes, once, a ring
of ``slots`` shared buffers per worker, each as large as a full batch, and a shared table of the
slots that are taken. A worker takes a free slot of its own row, marks it taken, gathers into it
and sends only ``Slot(worker, slot, offset)`` per model; the loader's process makes the batch
tensors as views of its own mapping of that slot (no copy, no mapping) and marks the slot free
again once no tensor views it any more (its storage's use count is back to the ring's own:
tensor views hold the storage, not the Python tensor, so Python reference counts cannot tell).
A worker never waits for a slot: with none free (the consumer holds its batches) it sends a
fresh shared tensor, so a slot is never written while anything in the loader's process can see
it. A worker's memory is its two shards plus its ring, however many batches are in flight.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

SHM_BYTES = 1 << 20  # a worker's batch features at least this large go over shared memory
ALIGN = 64  # each model's features in a slot start at a multiple of this
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}
# the storage use count comes from a private torch function; without it, no ring
RING_WORKS = hasattr(torch._C, "_storage_Use_Count")


class Slot(NamedTuple):
    """Where a worker put one model's features: this many bytes into its ring slot."""
    worker: int
    slot: int
    offset: int


def _use_count(buffer: torch.Tensor) -> int:
    """References to ``buffer``'s storage: its own, plus one per tensor viewing it."""
    return torch._C._storage_Use_Count(buffer.untyped_storage()._cdata)


def _shared(nbytes: int) -> torch.Tensor:
    """Shared memory, its pages untouched (``share_memory_`` would copy a fresh tensor in)."""
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(nbytes))


class BatchRing:
    """``slots`` shared buffers of ``nbytes`` per worker, made in the loader's process before
    the workers start (they inherit them, or receive them pickled as file descriptors)."""

    def __init__(self, workers: int, slots: int, nbytes: int):
        self.nbytes = nbytes
        self.buffers = [[_shared(nbytes) for _ in range(slots)] for _ in range(workers)]
        self.taken = torch.zeros((workers, slots), dtype=torch.uint8).share_memory_()
        self.idle = _use_count(self.buffers[0][0])  # the ring's own references
        self.handed: set[tuple[int, int]] = set()  # slots whose batch this process made
        self.busy = False  # one iteration at a time: a second one sends fresh memory

    # ---- in the loader's process

    def start(self) -> None:
        """Before the workers start: slots the workers of an ended iteration took but never
        sent are free (those workers are gone); the others once no batch views them."""
        self.release()
        taken = self.taken.numpy()
        for w, s in zip(*np.nonzero(taken)):
            if (w, s) not in self.handed:
                taken[w, s] = 0

    def release(self) -> None:
        """Mark free the slots whose batches nothing views any more."""
        for w, s in [ws for ws in self.handed if _use_count(self.buffers[ws[0]][ws[1]])
                     == self.idle]:
            self.handed.discard((w, s))
            self.taken[w, s] = 0

    def view(self, where: Slot, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        """The flat features a worker put at ``where`` (a view: the slot is handed out)."""
        self.handed.add((where.worker, where.slot))
        return self.buffers[where.worker][where.slot][where.offset:where.offset + nbytes] \
            .view(dtype)

    # ---- in a worker

    def take(self, worker: int) -> int | None:
        """A free slot of ``worker``'s row, now marked taken; None when all are taken."""
        row = self.taken[worker].numpy()
        free = np.flatnonzero(row == 0)
        if not len(free):
            return None
        row[free[0]] = 1
        return int(free[0])


class WorkerAlloc:
    """The memory one batch's features are gathered into in a worker: called per model with
    (shape, dtype), it returns (what crosses to the loader's process, the numpy view to fill).

    Below ``SHM_BYTES``, a bytearray the pipe carries in the batch's one pickle (shared memory
    costs more than the copy); above, the batch's ring slot, taken at the first such model;
    else (no ring, or no slot free) a fresh shared-memory tensor (passed as a file descriptor).
    """

    def __init__(self, ring: BatchRing | None, worker: int):
        self.ring, self.worker = ring, worker
        self.slot, self.offset = None, 0

    def __call__(self, shape: tuple, dtype: np.dtype) -> tuple:
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < SHM_BYTES:
            buf = bytearray(nbytes)
            return buf, np.frombuffer(buf, dtype).reshape(shape)
        if self.ring is not None and self.slot is None:
            self.slot = self.ring.take(self.worker)
        if self.slot is not None and self.offset + nbytes <= self.ring.nbytes:
            start = self.offset
            self.offset += -(-nbytes // ALIGN) * ALIGN
            out = self.ring.buffers[self.worker][self.slot].numpy()[start:start + nbytes]
            return Slot(self.worker, self.slot, start), out.view(dtype).reshape(shape)
        out = torch.empty(shape, dtype=TORCH_DTYPES[dtype.name]).share_memory_()
        return out, out.numpy()


def received(sent, nbytes: int, dtype: torch.dtype, ring: BatchRing | None) -> torch.Tensor:
    """What ``WorkerAlloc`` sent (or a tensor made in process), as a tensor in this process:
    a view of a ``ring`` slot, a shared tensor, or a flat tensor over the pipe's bytes."""
    if isinstance(sent, Slot):
        return ring.view(sent, nbytes, dtype)
    if torch.is_tensor(sent):
        return sent
    # torch.frombuffer refuses an empty buffer
    return torch.frombuffer(sent, dtype=dtype) if sent else torch.empty(0, dtype=dtype)


def ring_bytes(batch_bytes: list[int]) -> int:
    """A slot's size: the full-batch bytes of every model that goes over shared memory (0: no
    ring, also when this torch cannot count a storage's uses)."""
    return RING_WORKS * sum(-(-n // ALIGN) * ALIGN for n in batch_bytes if n >= SHM_BYTES)
