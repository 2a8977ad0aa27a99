"""What decoding tells about a video besides its pixels: the signs of silently wrong data.

A damaged or truncated file often decodes without an error: the decoder conceals the damage,
or repeats (or pads) frames it could not decode, and the clip looks like any other. Three cheap
signs, none of which decodes anything twice:

- ``libav_messages``: the warnings and errors PyAV's libav logs while it reads a file in this
  thread (the probe's demux of every packet and first-frame decode; the PyAV route's decode).
  DALI's decoder is a libav of its own whose log PyAV does not see: for DALI-routed videos only
  the probe's messages (container damage) and the clip checks below are seen, not the bitstream
  errors met inside DALI. Messages logged by libav's own worker threads are not attributed to a
  video either (they go to Python's ``logging``, logger ``libav``).
- ``frame_count_shortfall``: fewer video packets than the container's header claims frames
  (a truncated file, or packets lost to damage).
- ``repeated_frames``: decoded frames equal to the one before although another frame index was
  asked for. A clip of a short video repeats indices by the sampling rule, which is not counted;
  a truncated video decoded as one frame padded or repeated 16 times is. A video whose picture
  really does not change (a still) is counted too: it is flagged, never dropped, unless the user
  asks ``featurize --strict``.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from bombkd_io.errors import needs_extra

with needs_extra("video"):
    import av

MAX_MESSAGES = 3           # distinct libav messages kept per video (a damaged file logs hundreds)
_enable_lock = threading.Lock()
_enabled = False


def _enable_libav_log() -> None:
    """Route libav's warnings and errors to PyAV's callback (PyAV drops them by default).

    Left alone where the application set a level itself. Repeats are not folded: PyAV folds a
    message identical to the previous one, which would hide the second of two videos damaged
    the same way."""
    global _enabled
    with _enable_lock:
        if not _enabled and av.logging.get_level() is None:
            av.logging.set_level(av.logging.WARNING)
            av.logging.set_skip_repeated(False)
        _enabled = True


@contextlib.contextmanager
def libav_messages() -> Iterator[list[str]]:
    """Collect libav's warnings and errors logged in this thread inside the block.

    Yields a list, filled when the block ends: at most ``MAX_MESSAGES`` distinct
    ``"libav <component>: <message>"`` lines, and a count of the rest."""
    _enable_libav_log()
    found: list[str] = []
    with av.logging.Capture(local=True) as logs:
        try:
            yield found
        finally:
            found.extend(_summarised(logs))


def _summarised(logs: list[tuple[int, str, str]]) -> list[str]:
    lines = list(dict.fromkeys(f"libav {name or 'log'}: {message.strip()}"
                               for level, name, message in logs
                               if level <= av.logging.WARNING and message.strip()))
    if len(lines) > MAX_MESSAGES:
        lines = lines[:MAX_MESSAGES] + [f"libav: {len(lines) - MAX_MESSAGES} more messages"]
    return lines


def claimed_frames(container, stream) -> int | None:
    """Frames the container's header claims for ``stream``: the smaller of its frame count (mp4,
    avi store one) and duration x frame rate (webm / mkv have only this); an MP4 edit list cuts
    frames off the duration but not off the count. None when it claims neither."""
    rate = stream.average_rate or stream.guessed_rate
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration:
        seconds = container.duration / av.time_base
    else:
        seconds = 0.0
    claims = [round(seconds * float(rate))] if rate and seconds > 0 else []
    claims += [int(stream.frames)] if stream.frames else []
    return min(claims) if claims else None


def frame_count_shortfall(count: int, claimed: int | None) -> str | None:
    """A message when ``count`` packets are clearly fewer than the ``claimed`` frames.

    One frame (or 2%) of slack: a header's duration may or may not include the last frame's."""
    if claimed is None or count >= claimed - max(1, claimed // 50):
        return None
    return (f"only {count} of the {claimed} frames the container claims are in the file "
            "(truncated or damaged)")


def repeated_frames(clips: torch.Tensor, indices: Sequence[np.ndarray]) -> list[int]:
    """Per clip of ``clips`` uint8 ``[B, T, S, S, 3]`` (any device): frames equal to the frame
    before although ``indices`` (int ``[T]`` per clip, non-decreasing) asked for another one.

    A sample of ~1,000 values per frame picks the candidates; only frames whose sample equals
    their predecessor's are compared in full. About 0.05 ms per 16-frame clip on one CPU core,
    against several ms to decode it."""
    if clips.shape[0] == 0 or clips.shape[1] < 2:
        return [0] * clips.shape[0]
    flat = clips.flatten(2)                                     # [B, T, S*S*3]
    step = max(1, flat.shape[2] // 1024)
    step += step % 3 == 0                                       # every channel, not just R
    sample = flat[:, :, ::step]                                 # [B, T, ~1024]
    same = (sample[:, 1:] == sample[:, :-1]).all(dim=2).cpu()  # [B, T-1]
    asked_new = torch.from_numpy(np.stack([np.diff(np.asarray(i)) != 0 for i in indices]))
    repeats = [0] * clips.shape[0]
    for b, t in (same & asked_new).nonzero().tolist():
        repeats[b] += bool(torch.equal(flat[b, t + 1], flat[b, t]))
    return repeats


def repeat_message(repeats: int, indices: np.ndarray) -> str:
    """The distinct frames a clip decoded vs the distinct frame indices it asked for."""
    asked = len(np.unique(indices))
    return (f"{asked - repeats} distinct frames decoded for {asked} distinct frames requested "
            "(the rest repeat the frame before: undecodable or missing frames?)")
