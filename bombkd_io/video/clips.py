"""Clips for many videos, batch by batch, decoded in a background thread; and ``decode_clip``.

Every clip goes through the DALI pipeline of ``dali.py``; a video whose codec DALI cannot decode
on this device is decoded by PyAV (sampled frames only) and enters the same pipeline raw, so the
resize and crop are the same code for all. A video that fails is recorded, never fatal; one that
decodes with signs of damage (libav messages on the PyAV route, frames repeated although others
were asked for: ``health.py``) is named in ``ClipBatch.warnings``.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from bombkd_io.errors import VideoError
from bombkd_io.sampling import sample_indices
from bombkd_io.video.dali import DaliClipDecoder, DaliRunError, Sample, encoded_sample, raw_sample
from bombkd_io.video.health import libav_messages, repeat_message, repeated_frames
from bombkd_io.video.probe import VideoInfo, probe_video
from bombkd_io.video.pyav import decode_frames
from bombkd_io.video.resize import resize_crop
from bombkd_io.video.route import DecodeCaps, device_caps, parse_device, route_for

BACKENDS = ("dali", "pyav")


@dataclass
class ClipBatch:
    """One batch of ``ClipLoader``: the clips that decoded, and what happened to the others."""

    positions: list[int]                  # positions (in the loader's videos) that decoded
    clips: torch.Tensor                   # uint8 [B, T, S, S, 3], on the GPU for device "gpu"
    frame_indices: list[np.ndarray]       # per clip, int64 [T]
    failed: list[tuple[int, str]] = field(default_factory=list)   # (position, reason)
    # decoded, but maybe wrongly (health.py): position -> libav messages, repeated frames
    warnings: dict[int, list[str]] = field(default_factory=dict)
    # per clip, who decoded it and on which pipeline device: "dali/cpu", "dali/mixed" (NVDEC and
    # DALI's CUDA colour conversion), "pyav/cpu", "pyav/mixed" (PyAV + swscale, resized on the
    # GPU). Clips of different entries differ slightly (DECODERS.md).
    decoded_by: list[str] = field(default_factory=list)


def video_route(info: VideoInfo, caps: DecodeCaps) -> str:
    """"dali" or "pyav" for ``info`` on a device with ``caps`` (the probe's device may differ)."""
    return route_for(info.codec, info.container, info.pix_fmt, info.width, info.height,
                     caps).decoder


def decoder_of(info: VideoInfo, caps: DecodeCaps) -> str:
    """Who decodes ``info`` on a device with ``caps``, and on which pipeline device: the
    ``ClipBatch.decoded_by`` of its clips ("dali/cpu", "pyav/mixed", ...)."""
    return f"{video_route(info, caps)}/{caps.device}"


def make_sample(info: VideoInfo, indices: np.ndarray, caps: DecodeCaps) -> Sample:
    """Encoded bytes for DALI's decoder, or PyAV-decoded frames where DALI cannot decode it."""
    if video_route(info, caps) == "dali":
        return encoded_sample(info.path, indices)
    return raw_sample(decode_frames(info.path, indices), indices)


class ClipLoader:
    """Decodes requested batches of positions into ``ClipBatch``es, ahead of the consumer."""

    def __init__(self, videos: list[VideoInfo], *, frames: int, size: int, batch_size: int,
                 device: str | None = None, num_threads: int = 2, prefetch: int = 2):
        if frames < 1 or size < 1 or batch_size < 1 or prefetch < 1:
            raise ValueError(f"frames, size, batch_size and prefetch must be >= 1, got "
                             f"{frames}, {size}, {batch_size}, {prefetch}")
        self.videos, self.frames, self.size = list(videos), frames, size
        self.batch_size, self.prefetch = batch_size, prefetch
        self.device = parse_device(device)
        self.decoder = DaliClipDecoder(size=size, batch_size=batch_size, device=self.device,
                                       num_threads=num_threads)
        self.caps = device_caps(self.device)   # on the caller's thread, like the GPU index
        self._lock = threading.Lock()    # one pipeline: streams of batches() take turns on it
        # PyAV-routed videos decode outside DALI; PyAV releases the GIL while decoding, so a
        # batch's videos decode side by side, like DALI's own threads do for the rest.
        self._pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="bombkd-pyav")

    def close(self) -> None:
        """Release the DALI pipeline and the PyAV threads. Call it when done (or use ``with``);
        a closed loader decodes no more."""
        self._pool.shutdown(wait=True)
        self.decoder.close()

    def __enter__(self) -> ClipLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def decode_batch(self, positions: Sequence[int]) -> ClipBatch:
        """One batch, in the calling thread."""
        if len(positions) > self.batch_size:
            raise ValueError(f"a batch of {len(positions)} exceeds the loader's batch_size "
                             f"{self.batch_size}")
        samples, kept, failed, notes = [], [], [], {}
        for pos, (sample, messages) in zip(positions, self._pool.map(self._sample, positions)):
            if isinstance(sample, Sample):
                samples.append(sample)
                kept.append(int(pos))
                notes[int(pos)] = messages
            else:
                failed.append((int(pos), sample))
        with self._lock:
            clips, kept = self._run(samples, kept, failed)
        indices = [sample_indices(self.videos[p].num_frames, self.frames) for p in kept]
        for pos, idx, repeats in zip(kept, indices, repeated_frames(clips, indices)):
            if repeats:
                notes[pos].append(repeat_message(repeats, idx))
        return ClipBatch(kept, clips, indices, failed, {p: notes[p] for p in kept if notes[p]},
                         [decoder_of(self.videos[p], self.caps) for p in kept])

    def _sample(self, pos: int) -> tuple[Sample | str, list[str]]:
        """The pipeline input for one position (or the reason it has none), and what libav
        logged meanwhile (PyAV-routed videos decode here; a DALI-routed one is only read)."""
        info = self.videos[int(pos)]
        with libav_messages() as messages:
            try:
                sample = make_sample(info, sample_indices(info.num_frames, self.frames),
                                     self.caps)
            except (VideoError, ValueError) as err:
                sample = getattr(err, "reason", str(err))
        return sample, messages

    def _run(self, samples: list[Sample], kept: list[int], failed: list) -> tuple:
        """Decode the batch; after a pipeline error, one sample at a time to find the bad one."""
        if not samples:
            return self._empty(), kept
        try:
            return self.decoder.run(samples), kept
        except DaliRunError:
            pass
        clips, good = [], []
        for sample, pos in zip(samples, kept):
            try:
                clips.append(self.decoder.run([sample]))
                good.append(pos)
            except DaliRunError as err:
                failed.append((pos, str(err)))
        return (torch.cat(clips) if clips else self._empty()), good

    def _empty(self) -> torch.Tensor:
        gpu = self.decoder.device_id
        on = "cpu" if gpu is None else torch.device("cuda", gpu)
        return torch.empty((0, self.frames, self.size, self.size, 3), dtype=torch.uint8, device=on)

    def batches(self, batches: Iterable[Sequence[int]]) -> Iterator[ClipBatch]:
        """Yield a ClipBatch per requested batch, in order, decoded ``prefetch`` batches ahead."""
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        worker = threading.Thread(target=self._produce, args=(batches, out, stop),
                                  name="bombkd-clip-decode", daemon=True)
        worker.start()
        try:
            while True:
                try:
                    item = out.get(timeout=1.0)
                except queue.Empty:
                    if not worker.is_alive() and out.empty():
                        raise RuntimeError("the clip decoding thread stopped unexpectedly")
                    continue
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()              # the consumer stopped early (or finished): release the worker
            worker.join()

    def _produce(self, batches, out: queue.Queue, stop: threading.Event) -> None:
        """Worker thread: decode each batch and queue it; then queue _DONE (or the exception)."""
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for positions in batches:
                if stop.is_set() or not put(self.decode_batch(list(positions))):
                    return
        except BaseException as err:    # handed to the consumer, raised there
            put(err)
            return
        put(_DONE)


_DONE = object()


def decode_clip(path: str | Path, frames: int = 16, size: int = 112, backend: str = "dali",
                device: str | None = None) -> np.ndarray:
    """One clip of ``path``: uint8 RGB ``[T, S, S, 3]``; VideoError names the file.

    ``backend="dali"`` decodes with DALI (PyAV where DALI lacks the codec on this device);
    ``backend="pyav"`` uses PyAV and a torch resize only (no DALI).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    info = probe_video(path, device)
    indices = sample_indices(info.num_frames, frames)
    if backend == "pyav":
        return resize_crop(decode_frames(info.path, indices), size)
    decoder = DaliClipDecoder(size=size, batch_size=1, device=device, num_threads=1)
    try:
        return decoder.run([make_sample(info, indices, device_caps(device))])[0].cpu().numpy()
    except DaliRunError as err:
        raise VideoError(info.path, str(err)) from err
    finally:
        decoder.close()
