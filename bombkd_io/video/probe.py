"""Probe a video with PyAV: codec, container, size, fps, exact frame count, and which decoder
takes it and why (``route.py``'s rule).

The frame count is counted the way DALI's decoder indexes a file: one video packet per frame
(for the codecs we route to it), leaving out packets with a negative timestamp, which an MP4
edit list puts before the start (DALI skips them, and so does a PyAV decode); reading packets
costs no decoding. A count above DALI's would sample frames past its end: black frames. A probe
also decodes the first frame, so a file with no decodable frame is refused here instead of
failing inside a DALI pipeline (where an error invalidates the pipeline).
What libav logs meanwhile, and a packet count short of the header's claim, become the video's
``warnings`` (``health.py``): it decodes, but maybe not as it should.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

from tqdm import tqdm

from bombkd_io.datasets import VideoIndex
from bombkd_io.errors import DatasetError, ErrorPolicy, VideoError, needs_extra
from bombkd_io.video.health import claimed_frames, frame_count_shortfall, libav_messages
from bombkd_io.video.pyav import is_frame_packet
from bombkd_io.video.route import check_file, device_caps, route_for

with needs_extra("video"):
    import av

# FFmpeg renders any text file as "video" through its tty demuxer; that is never a dataset video.
TEXT_FORMATS = frozenset({"tty", "bin", "idf", "xbin", "adf"})


@dataclass(frozen=True)
class VideoInfo:
    """What ``probe_video`` found: the stream, and the decoder it routes to on a device."""

    path: str           # absolute path
    codec: str          # FFmpeg codec name, e.g. "vp9", "h264"
    width: int
    height: int
    fps: float
    num_frames: int     # decodable frames (video packets), the n of sample_indices(n, T)
    route: str          # "dali" | "pyav" for the device it was probed for
    pix_fmt: str = ""
    # what looked wrong while probing: libav messages, fewer packets than the header claims
    warnings: tuple[str, ...] = ()
    container: str = ""     # FFmpeg demuxer name, e.g. "matroska,webm", "avi"
    reason: str = ""        # why this route (route_for's reason)
    device: str = "cpu"     # DALI's decoder device it was routed for: "cpu" | "mixed"


def _count_and_check(container: av.container.InputContainer, stream, path: Path) -> int:
    """Count video packets as DALI indexes them; decode until the first frame comes out (a
    readable stream)."""
    count, decoded = 0, False
    for packet in container.demux(stream):
        if packet.size == 0:            # the demuxer's final flush packet
            continue
        count += is_frame_packet(packet)    # still decoded below: later frames may need it
        if not decoded:
            try:
                decoded = bool(stream.codec_context.decode(packet))
            except av.error.FFmpegError:
                pass                    # a damaged first packet; a later one may still decode
    if not decoded and count:
        try:    # flush: codecs with reordering emit the first frame only here
            decoded = bool(stream.codec_context.decode(None))
        except av.error.FFmpegError:
            pass
    if not decoded:
        raise VideoError(path, "no decodable video frame", "re-encode or remove the file")
    return count


def probe_video(path: str | Path, device: str | None = "cpu") -> VideoInfo:
    """Codec, size, fps, frame count and decode route (and why) of one file on ``device``;
    VideoError names the file.

    ``warnings`` holds what libav logged while reading it and a frame count short of the
    container's claim (see ``health.py``): such a file decodes, but maybe not as it should."""
    path = check_file(path)
    with libav_messages() as messages:
        info, claimed = _probe(path, device)
    shortfall = frame_count_shortfall(info.num_frames, claimed)
    return replace(info, warnings=tuple(messages) + ((shortfall,) if shortfall else ()))


def _probe(path: Path, device: str | None) -> tuple[VideoInfo, int | None]:
    """The VideoInfo (no warnings yet) and the frame count the container claims."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video or container.format.name in TEXT_FORMATS:
                raise VideoError(path, "no video stream", "pass a video file")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            # the codec, not the decoder PyAV picked for it ("av1", not "libdav1d")
            codec, pix_fmt = ctx.codec.canonical_name, ctx.pix_fmt or ""
            demuxer = container.format.name
            width, height = ctx.width, ctx.height
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            claimed = claimed_frames(container, stream)
            num_frames = _count_and_check(container, stream, path)
    except VideoError:
        raise
    except (av.error.FFmpegError, UnicodeDecodeError, OSError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise VideoError(path, f"not a readable video ({reason})") from err
    caps = device_caps(device)
    route = route_for(codec, demuxer, pix_fmt, width, height, caps)
    return VideoInfo(str(path), codec, width, height, float(rate) if rate else 0.0, num_frames,
                     route.decoder, pix_fmt, container=demuxer, reason=route.reason,
                     device=caps.device), claimed


def probe_videos(paths: Iterable[str | Path], device: str | None = "cpu", on_error: str = "skip",
                 progress: bool = False) -> tuple[list[VideoInfo], list[tuple[str, str]]]:
    """Probe many files. ``on_error="skip"`` records ``(path, reason)``; ``"raise"`` stops."""
    policy = ErrorPolicy(on_error)
    ok, failed = [], []
    for path in tqdm(list(paths), desc="probe", unit="video", disable=not progress):
        try:
            ok.append(probe_video(path, device))
        except VideoError as err:
            if not policy.skips:
                raise
            failed.append((os.fspath(path), err.reason))
    return ok, failed


def probe_index(index: VideoIndex, positions: Sequence[int], device: str | None = "cpu", *,
                progress: bool = False) -> tuple[list[int], list[VideoInfo], list[tuple[str, str]]]:
    """Probe the items of ``index`` at ``positions``: the decodable positions (in order), their
    infos, and ``(path, reason)`` of the others. DatasetError when none can be read."""
    infos, failed = probe_videos([index.items[i].path for i in positions], device,
                                 on_error="skip", progress=progress)
    return index_probed(index, positions, infos, failed)


def index_probed(index: VideoIndex, positions: Sequence[int], infos: list[VideoInfo],
                 failed: list[tuple[str, str]]) -> tuple[list[int], list[VideoInfo],
                                                         list[tuple[str, str]]]:
    """``probe_index``'s answer from what ``probe_videos`` found for those ``positions`` (in
    any order: probed by several processes)."""
    by_path = {info.path: info for info in infos}
    ok = [i for i in positions if index.items[i].path in by_path]
    if not ok:
        first = f" (first: {failed[0][0]}: {failed[0][1]})" if failed else ""
        raise DatasetError(f"none of the {len(positions)} {index.split} videos of {index.dataset} "
                           f"in {index.root} can be read{first}")
    return ok, [by_path[index.items[i].path] for i in ok], failed
