"""torch.distributed for the training side, and the device each rank trains on: one place to
join, ask and sum.

``torchrun`` describes the process group in the environment (``WORLD_SIZE``, ``LOCAL_RANK``);
``init_distributed`` joins it once. Everything else asks ``is_distributed`` and sums across
ranks with ``all_reduce_sum``. (``bombkd_io`` never imports this package; its loader asks
torch.distributed for the rank itself.)
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from bombkd_io.video import is_cuda, parse_device


def is_distributed() -> bool:
    """Whether this process is in an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def launch_rank() -> int:
    """This process's rank, before or after ``init_distributed``: the process group's, else the
    one ``torchrun`` gave it (``RANK``), else 0."""
    if is_distributed():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def init_distributed(device: str) -> tuple[str, int, int]:
    """Device (``--device``, parsed), rank and world size; joins the process group that
    ``torchrun`` describes (one GPU per rank: ``cuda:LOCAL_RANK``)."""
    device = parse_device(device)
    cuda = is_cuda(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
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
