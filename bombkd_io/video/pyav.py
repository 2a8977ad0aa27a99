"""PyAV decoding of the sampled frames only (their resize is ``resize.py``'s).

Decoding is sequential for inter-coded video (every frame depends on earlier ones), but only the
wanted frames are converted to RGB and decoding stops after the last wanted one; for intra-only
codecs (MJPEG) only the wanted packets are decoded at all.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bombkd_io.errors import VideoError, needs_extra

with needs_extra("video"):
    import av
    from av.video.reformatter import Interpolation, VideoReformatter
from bombkd_io.video.route import check_file

# The swscale flags DALI's CPU decoder converts with: with them PyAV's RGB frames are bit-identical
# to DALI's (measured on vp9 and mjpeg); PyAV's default flags differ by ~1.5 levels on average.
RGB_FLAGS = Interpolation.BILINEAR | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT


def decode_frames(path: str | Path, indices: np.ndarray) -> np.ndarray:
    """Frames ``indices`` (presentation order, repeats allowed) as uint8 RGB ``[T, H, W, 3]``."""
    path = check_file(path)
    wanted = set(int(i) for i in indices)
    last, got = max(wanted), {}
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            # Slice threads only: frame threads buffer frames past the last wanted one, and
            # measured no faster on short clips.
            stream.thread_type = "SLICE"
            intra = stream.codec_context.codec.intra_only
            frames = (_intra_frames(container, stream, wanted) if intra
                      else _sequential_frames(container, stream))
            # One reformatter keeps its swscale context across the clip's frames;
            # frame.to_ndarray(format=...) builds a new one per frame (5x slower here).
            rgb = VideoReformatter()
            for number, frame in frames:
                if number in wanted:
                    got[number] = rgb.reformat(frame, format="rgb24",
                                               interpolation=RGB_FLAGS).to_ndarray()
                if number >= last:
                    break
    except (av.error.FFmpegError, IndexError, OSError) as err:
        if len(got) < len(wanted):
            raise VideoError(path, f"decoding failed ({err})") from err
    if len(got) < len(wanted):
        missing = sorted(wanted - got.keys())
        raise VideoError(path, f"frame {missing[0]} not decodable (only {len(got)} of the "
                               f"{len(wanted)} sampled frames decoded)")
    return np.stack([got[int(i)] for i in indices])      # [T, H, W, 3]


def is_frame_packet(packet) -> bool:
    """Whether a demuxed packet is a frame in DALI's numbering (and a PyAV decode's): not the
    demuxer's empty flush packet, and not before the start (a negative pts, or dts without a pts:
    frames an MP4 edit list cuts off, which DALI's index skips and libavcodec drops)."""
    stamp = packet.pts if packet.pts is not None else packet.dts
    return packet.size > 0 and (stamp is None or stamp >= 0)


def _sequential_frames(container, stream):
    """(frame number, frame) in presentation order: every frame must be decoded."""
    return enumerate(container.decode(stream))


def _intra_frames(container, stream, wanted: set[int]):
    """Intra-only codecs (MJPEG): packet ``n`` is frame ``n``, so decode only wanted packets."""
    number = 0
    for packet in container.demux(stream):
        if not is_frame_packet(packet):
            continue
        if number in wanted:
            for frame in stream.codec_context.decode(packet):
                yield number, frame
        number += 1

