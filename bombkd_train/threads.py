"""Sharing the CPU between decode threads and torch's intra-op threads.

torch's intra-op threads spin-wait; oversubscribed (decode threads + as many torch threads as
cores) they run several times slower than with fewer threads. Measured on 2 cores: featurize with
1 model thread + decoding was ~5x faster than with 2 + decoding, and the video loader ran at 53
clips/s with 1 + 1 threads against 5 clips/s with 2 + 2.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch


def cpu_cores() -> int:
    """Cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def decode_threads_for(cores: int | None = None) -> int:
    """Default decode threads: half the cores, at least one."""
    return max(1, (cores or cpu_cores()) // 2)


@contextlib.contextmanager
def model_threads(device: str, decode_threads: int) -> Iterator[int]:
    """On the CPU, cap torch's threads so ``decode_threads`` keep a core each; restored on exit.

    Yields the torch thread count in force. A GPU run changes nothing.
    """
    before = torch.get_num_threads()
    if not str(device).startswith("cuda"):
        cores = cpu_cores()
        torch.set_num_threads(max(1, min(before, cores - min(decode_threads, cores // 2))))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
