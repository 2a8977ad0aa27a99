"""How many threads torch may use on the CPU, next to decode threads, loader workers and
whatever else runs on the machine.

torch's intra-op threads spin-wait at every parallel region: when they outnumber the cores that
are free, a descheduled thread stalls all the others. Measured on 2 cores: featurize with 1 model
thread + decoding was ~5x faster than with 2 + decoding; the video loader ran at 53 clips/s with
1 + 1 threads against 5 clips/s with 2 + 2; cached-mode training with one competing busy process
ran at ~2,000 samples/s with 1 thread against ~420 with 2 (idle: the same within noise). So torch
gets every core but one (left to the rest of the machine) and those reserved for our own
threads or workers, at least one.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from bombkd_io.video import is_cuda


def cpu_cores() -> int:
    """Cores this process may use: its CPU affinity, shared among the ranks ``torchrun``
    started on this node (``LOCAL_WORLD_SIZE``)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, (cores or 1) // local_ranks)


def decode_threads_for(cores: int | None = None) -> int:
    """Default decode threads: half the cores, at least one."""
    return max(1, (cores or cpu_cores()) // 2)


def torch_threads_for(reserved: int = 0, cores: int | None = None) -> int:
    """torch's intra-op threads beside ``reserved`` threads or processes of our own: every core
    but one and the reserved ones (at most half the cores are reserved), at least one."""
    cores = cores or cpu_cores()
    return max(1, cores - 1 - min(max(reserved, 0), cores // 2))


@contextlib.contextmanager
def model_threads(device: str, reserved: int = 0) -> Iterator[int]:
    """On the CPU, cap torch's threads at ``torch_threads_for(reserved)``; restored on exit.

    Yields the torch thread count in force. A GPU run changes nothing (its CPU side is light).
    """
    before = torch.get_num_threads()
    if not is_cuda(device):
        torch.set_num_threads(min(before, torch_threads_for(reserved)))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
