"""The clip contract's resize outside DALI: shorter side to ``S`` (bilinear, antialiased), then a
centre ``S x S`` crop, with DALI's sizes and crop offsets.

DALI's ``resize_crop_mirror(resize_shorter=S, crop=(S, S))`` rounds the resized size and the crop
offset half up; ``resize_plan`` does the same, so PyAV-decoded clips (``backend="pyav"``) and
backbones that resize on the device cut the same window as the DALI pipeline, and differ from it
only by the filter.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _round(value: float) -> int:
    """Round half up, as DALI does (Python's ``round`` rounds half to even)."""
    return math.floor(value + 0.5)


def resize_plan(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(resized height, resized width, crop top, crop left) for a ``height x width`` frame."""
    short = min(height, width)
    out_h, out_w = _round(height * size / short), _round(width * size / short)
    return out_h, out_w, _round((out_h - size) / 2), _round((out_w - size) / 2)


def resize_crop_tensor(x: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, C, H, W]`` (uint8 or float, any device) -> ``[N, C, S, S]``, same dtype.

    uint8 in channels-last memory (a permuted ``[N, H, W, C]`` view) takes torch's vectorised
    uint8 kernel: ~40x faster than the float path at clip sizes.
    """
    out_h, out_w, top, left = resize_plan(x.shape[-2], x.shape[-1], size)
    if (out_h, out_w) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=(out_h, out_w), mode="bilinear", antialias=True,
                          align_corners=False)                          # [N, C, out_h, out_w]
    return x[:, :, top:top + size, left:left + size]                    # [N, C, S, S]


def resize_crop(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``[T, H, W, 3]`` -> ``[T, S, S, 3]``: ``resize_crop_tensor`` for numpy frames."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)   # [T, 3, H, W]
    return np.ascontiguousarray(resize_crop_tensor(x, size).permute(0, 2, 3, 1).numpy())
