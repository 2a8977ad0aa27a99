"""The process's runtime: which rank and device it trains on (torch.distributed), how many
CPU threads torch may use beside our own, and the precision and determinism the backbones and
the trainer run with (``parity_settings``).

``torchrun`` describes the process group in the environment (``WORLD_SIZE``, ``LOCAL_RANK``):
``launch_world`` / ``launch_rank`` read it, ``init_distributed`` joins it once. Everything else
asks ``is_distributed`` and sums across ranks with ``all_reduce_sum`` (or collects one row per
rank with ``all_gather_rows``). (``bombkd_io`` never imports this package; its loader asks
torch.distributed for the rank itself.)

``stop_signals`` turns SIGTERM, SIGINT and SIGUSR1 (what schedulers send before they preempt a
job) into a request the training loop reads after each step; a second one ends the process at
once.

torch's intra-op threads spin-wait at every parallel region: when they outnumber the cores that
are free, a descheduled thread stalls all the others. Measured on 2 cores: featurize with 1 model
thread + decoding was ~5x faster than with 2 + decoding; the video loader ran at 53 clips/s with
1 + 1 threads against 5 clips/s with 2 + 2; cached-mode training with one competing busy process
ran at ~2,000 samples/s with 1 thread against ~420 with 2 (idle: the same within noise). So torch
gets every core but one (left to the rest of the machine) and those reserved for our own
threads or workers, at least one (``model_threads``).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Iterator

import torch
import torch.distributed as dist

from bombkd_io.video.route import is_cuda, parse_device


def is_distributed() -> bool:
    """Whether this process is in an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def launch_world() -> int:
    """How many processes ``torchrun`` started (``WORLD_SIZE``); 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def launch_rank() -> int:
    """This process's rank, before or after ``init_distributed``: the process group's, else the
    one ``torchrun`` gave it (``RANK``), else 0."""
    if is_distributed():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launch_world() > 1 else 0


def init_distributed(device: str) -> tuple[str, int, int]:
    """Device (``--device``, parsed), rank and world size; joins the process group that
    ``torchrun`` describes (one GPU per rank: ``cuda:LOCAL_RANK``)."""
    device = parse_device(device)
    cuda = is_cuda(device)
    if launch_world() > 1 and not is_distributed():
        if cuda:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    if is_distributed():
        return device, dist.get_rank(), dist.get_world_size()
    return device, 0, 1


def all_reduce_sum(t: torch.Tensor, device: str) -> torch.Tensor:
    """``t`` summed over all ranks, as a new CPU tensor (``device``: where the backend sums,
    the rank's GPU for NCCL). Without a process group, ``t`` itself."""
    if not is_distributed():
        return t
    moved = t.to(device)
    dist.all_reduce(moved)
    return moved.cpu()


def all_gather_rows(t: torch.Tensor, device: str) -> torch.Tensor:
    """Every rank's 1-d ``t`` as the rows of one ``[world, len(t)]`` CPU tensor (row r: rank r's).
    Without a process group, ``t`` as the one row."""
    if not is_distributed():
        return t.unsqueeze(0)
    rows = [torch.empty_like(t, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, t.to(device))
    return torch.stack([r.cpu() for r in rows])  # [world, N]


# --- stop signals ----------------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
    """A signal handler that records the first stop signal (``signal``: its name, else None).

    A second signal ends the process at once, as that signal's default action does, except
    within ``grace`` seconds of the first: under torchrun a terminal's Ctrl-C or a scheduler's
    signal reaches every process of the job, and torchrun forwards it to its ranks as well, so
    each rank gets the same request twice."""

    def __init__(self, grace: float = 0.0):
        self.signal: str | None = None
        self.grace, self.at = grace, 0.0

    def __call__(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.signal is None:
            self.signal, self.at = signal.Signals(signum).name, now
        elif now - self.at >= self.grace:
            print(f"a second stop signal ({signal.Signals(signum).name}): stopping now, "
                  "without a checkpoint", file=sys.stderr, flush=True)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


@contextlib.contextmanager
def stop_signals() -> Iterator[StopRequest]:
    """Catch ``STOP_SIGNALS`` while the block runs (handlers restored on exit); yields the
    ``StopRequest`` to poll. Outside the main thread, where Python cannot catch signals, the
    request never fires."""
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    request = StopRequest(grace=2.0 if torchrun else 0.0)
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    before = {s: signal.signal(s, request) for s in STOP_SIGNALS}
    try:
        yield request
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


# --- CPU threads ---------------------------------------------------------------------------


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


# --- precision and determinism -------------------------------------------------------------


@contextlib.contextmanager
def parity_settings() -> Iterator[None]:
    """Full fp32 and deterministic kernels for the backbones and the trainer; restored on exit.

    featurize, video mode's student and the trainer all run under it, so that a cache and video
    mode compute features the same way: TF32 off for matmuls and cuDNN convolutions (torch
    enables it for cuDNN by default, which changes features on a GPU), deterministic algorithms
    where they exist and a warning where they do not.
    """
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[2:]
