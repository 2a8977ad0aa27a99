"""The DALI clip pipeline: one graph for every video, on "cpu" or "mixed" (GPU) alike.

Per sample the pipeline receives, through ``external_source``:
- ``data``:   the encoded file (uint8 [N]), or for a PyAV-routed video its decoded frames, flat;
- ``frames``: the frame indices to decode (int32 [T]);
- ``raw``:    whether ``data`` already holds decoded frames (bool scalar);
- ``shape``:  the frames' shape [T, H, W, 3] when ``raw`` (int32 [4]).
A DALI conditional sends encoded samples to ``fn.decoders.video`` (no padding: an index past the
end raises) and raw ones to a reshape;
both then take the same resize and crop, so a clip is identical whichever decoder produced it.
The function must live in a file: DALI's conditionals rewrite its source.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bombkd_io.errors import VideoError, needs_extra

with needs_extra("dali"):
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.tensors import TensorGPU
from bombkd_io.video.route import check_file, cuda_index, dali_device


@pipeline_def(enable_conditionals=True)
def clip_pipeline(device: str, size: int):
    data = fn.external_source(name="data", dtype=types.UINT8, ndim=1)
    frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
    raw = fn.external_source(name="raw", dtype=types.BOOL, ndim=0)
    shape = fn.external_source(name="shape", dtype=types.INT32, ndim=1)
    if raw:
        clip = fn.reshape(data, shape=shape, layout="FHWC")        # [T, H, W, 3]
        if device == "mixed":
            clip = clip.gpu()
    else:
        # pad_mode="none": a frame index past DALI's frame count is an error (the clip is
        # recorded as failed), not a frame of zeros. DALI counts frames from the container's
        # header, so indices between the probed (decodable) count and the header's still come
        # back black: the probe's count is what keeps sampling inside the decodable frames.
        clip = fn.decoders.video(data, device=device, frames=frames, pad_mode="none")
    # Shorter side to S, centre S x S crop, fused: the same pixels as resize + crop, ~20% less
    # CPU, as only the kept window is resampled.
    return fn.resize_crop_mirror(clip, resize_shorter=size, crop=(size, size), antialias=True,
                                 interp_type=types.INTERP_LINEAR)   # [T, S, S, 3]


class DaliRunError(RuntimeError):
    """A pipeline run failed; the message is DALI's informative line."""


@dataclass
class Sample:
    """One pipeline input: encoded bytes (``raw=False``) or decoded frames [T, H, W, 3]."""
    data: np.ndarray
    indices: np.ndarray
    raw: bool


def encoded_sample(path: str, indices: np.ndarray) -> Sample:
    """The file's bytes for DALI's decoder (read here: DALI would not name the file)."""
    path = str(check_file(path))
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise VideoError(path, f"cannot read ({err})", "check the file's permissions") from err
    return Sample(data, indices, raw=False)


def raw_sample(frames: np.ndarray, indices: np.ndarray) -> Sample:
    return Sample(frames, indices, raw=True)


class DaliClipDecoder:
    """Runs batches of samples through ``clip_pipeline``; rebuilt after a pipeline error."""

    def __init__(self, *, size: int, batch_size: int, device: str | None = "cpu",
                 num_threads: int = 2):
        self.size, self.batch_size, self.num_threads = size, batch_size, num_threads
        self.device = dali_device(device)       # "cpu" or "mixed"
        # The GPU is fixed here, on the caller's thread: the pipeline is built later in a decode
        # thread, where torch's current device (per thread) is always 0.
        self.device_id = cuda_index(device)     # None on the CPU
        self._pipe = None

    def close(self) -> None:
        """Release the pipeline (its threads and buffers); a later ``run`` builds a new one."""
        self._pipe = None

    def _pipeline(self):
        if self._pipe is None:
            # Synchronous execution: the ClipLoader's thread already overlaps decode and compute,
            # and a synchronous pipeline fails on the batch that caused the error.
            self._pipe = clip_pipeline(device=self.device, size=self.size,
                                       batch_size=self.batch_size, num_threads=self.num_threads,
                                       device_id=self.device_id, exec_async=False,
                                       exec_pipelined=False, prefetch_queue_depth=1)
            self._pipe.build()
        return self._pipe

    def run(self, samples: list[Sample]) -> torch.Tensor:
        """Clips of ``samples`` as uint8 ``[B, T, S, S, 3]`` (on the GPU for "mixed").

        Raises DaliRunError on a sample it cannot decode; the pipeline is then dropped (DALI
        invalidates it) and the next call builds a fresh one.
        """
        pipe = self._pipeline()
        pipe.feed_input("data", [s.data.reshape(-1) for s in samples])
        pipe.feed_input("frames", [s.indices.astype(np.int32) for s in samples])
        pipe.feed_input("raw", [np.array(s.raw) for s in samples])
        pipe.feed_input("shape", [np.array(s.data.shape if s.raw else (1,), np.int32)
                                  for s in samples])
        try:
            (out,) = pipe.run()
        except Exception as err:    # DALI raises RuntimeError, IndexError, ... for a bad input
            self._pipe = None       # "Current pipeline object is no longer valid."
            raise DaliRunError(dali_error_reason(err)) from err
        return _to_torch(out.as_tensor(), self.device_id)


def _to_torch(tensor, device_id: int | None) -> torch.Tensor:
    """A dense DALI tensor -> torch, on its device (a copy: DALI reuses its buffers)."""
    if isinstance(tensor, TensorGPU):
        from nvidia.dali.plugin.pytorch import feed_ndarray

        device = torch.device("cuda", device_id)
        with torch.cuda.device(device):  # the decode thread's current device is 0 otherwise
            out = torch.empty(tensor.shape(), dtype=torch.uint8, device=device)
            return feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(device))
    return torch.from_numpy(np.array(tensor))


def dali_error_reason(err: Exception) -> str:
    """The informative line of a DALI pipeline error (its message is a long traceback)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    skip = ("Critical error", "Error in", "File ", "which was used", "encountered", "C++ context",
            "Current pipeline", "v = ", "clip = ")
    useful = [line for line in lines if not line.startswith(skip)]
    line = useful[0] if useful else (lines[0] if lines else type(err).__name__)
    return "DALI: " + line.split(" failed: ", 1)[-1]     # drop the C++ assert expression
