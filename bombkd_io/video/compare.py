"""How far two clips of the same video are apart: the measure of the DALI-vs-PyAV checks (the
tests, and the GPU check that compares each decode route with PyAV frame by frame).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# (mean, p99) levels between a DALI and a PyAV clip. On the CPU both convert colour with swscale
# and only the resize kernels differ (measured, DECODERS.md). On the GPU, NVDEC with DALI's CUDA
# colour conversion (BT.601, limited range, its own chroma upsampling): provisional until a GPU
# run measures it.
CPU_TOLERANCE = (0.3, 4)
GPU_TOLERANCE = (3.0, 24)


@dataclass(frozen=True)
class ClipDifference:
    mean: float                 # mean |a - b| in uint8 levels, over all pixels
    p99: float
    max: int
    # frames of ``a`` nearer another frame of ``b`` (the one before or after) than the frame
    # at their own index: a shifted, repeated or missing frame
    out_of_order: tuple[int, ...]

    def within(self, mean: float, p99: float) -> bool:
        """Within (mean, p99) levels, every frame in order."""
        return self.mean <= mean and self.p99 <= p99 and not self.out_of_order

    def __str__(self) -> str:
        order = (f", frames out of order: {list(self.out_of_order)}" if self.out_of_order
                 else ", frames in order")
        return f"mean {self.mean:.3f} p99 {self.p99:g} max {self.max} levels{order}"


def clip_difference(a: np.ndarray, b: np.ndarray) -> ClipDifference:
    """``a`` and ``b``: uint8 ``[T, S, S, 3]`` of the same frame indices."""
    if a.shape != b.shape:
        raise ValueError(f"clips of different shapes: {a.shape} and {b.shape}")
    a, b = a.astype(np.int16), b.astype(np.int16)
    diff = np.abs(a - b)                                   # [T, S, S, 3]
    out_of_order = []
    for t in range(len(a)):
        near = {u: float(np.abs(a[t] - b[u]).mean()) for u in (t - 1, t, t + 1)
                if 0 <= u < len(b) and (u == t or not np.array_equal(b[u], b[t]))}
        if min(near, key=near.get) != t:
            out_of_order.append(t)
    return ClipDifference(float(diff.mean()), float(np.percentile(diff, 99)), int(diff.max()),
                          tuple(out_of_order))
