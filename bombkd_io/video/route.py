"""Where a video is decoded: the one parser of device strings, what the decode device can take,
the stream -> decoder rule, and the file check before any decoder opens a file.

``parse_device`` reads ``--device`` for every command (``is_cuda``, ``dali_device`` and
``cuda_index`` derive from it). ``route_for`` is a pure function of a stream (codec, container,
pixel format, size) and a ``DecodeCaps`` (what DALI's decoder takes on that device); it says
whether DALI or PyAV decodes the stream, and why. ``device_caps`` builds the capabilities of a
device once per process: DALI's CPU codecs, or on a GPU the NVDEC table row of its compute
capability (``nvdec_caps``). Imports neither DALI nor PyAV, so ``bombkd_train`` uses it freely.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from bombkd_io.errors import ConfigError, VideoError

# What --device takes, everywhere: "auto" picks the GPU where torch sees one.
DEVICES = "auto, cpu, gpu, cuda or cuda:N"

def parse_device(spec: str | None, argument: str = "--device") -> str:
    """A device as the user wrote it -> torch's spelling: "cpu", "cuda" or "cuda:N".

    "auto" (or None) is "cuda" where torch sees a GPU, else "cpu"; "gpu" is "cuda". ConfigError
    names ``argument`` for anything else, and for a "cuda:N" this machine does not have."""
    if spec is None or spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    match = re.fullmatch(r"cpu|gpu|cuda(?::(\d+))?", spec)
    if match is None:
        raise ConfigError(f"{argument} {spec!r}: expected {DEVICES}")
    if match[1] is None:
        return "cuda" if spec == "gpu" else spec
    index, count = int(match[1]), torch.cuda.device_count()
    if index >= count:
        have = f"{count} GPU(s), cuda:0 to cuda:{count - 1}" if count else "no GPU; use cpu"
        raise ConfigError(f"{argument} {spec!r}: this machine has {have}")
    return f"cuda:{index}"


def is_cuda(device: str | None) -> bool:
    """Whether ``device`` (any spelling ``parse_device`` takes) is a GPU."""
    return parse_device(device) != "cpu"


def dali_device(device: str | None) -> str:
    """DALI's decoder device for ``device``: "mixed" (decode on the GPU) or "cpu"."""
    return "mixed" if is_cuda(device) else "cpu"


def cuda_index(device: str | None) -> int | None:
    """The GPU a "mixed" pipeline uses: ``N`` of "cuda:N", else torch's current GPU (0 where
    torch sees none); None on the CPU. Call it on the caller's thread: torch's current GPU is
    per thread."""
    parsed = torch.device(parse_device(device))
    if parsed.type == "cpu":
        return None
    if parsed.index is not None:
        return parsed.index
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


# DALI decodes 8-bit 4:2:0 only; anything else (4:2:2 camera MJPEG, 10-bit) goes through PyAV.
DALI_PIX_FMTS = frozenset({"yuv420p", "yuvj420p"})
# DALI 2.4's CPU decoder (its docs, and verified): the codecs of its own libavcodec build.
DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
# DALI 2.4's GPU decoder (FramesDecoderGpu::SelectVideoStream): MJPEG is commented out there,
# although the operator's docstring lists it.
DALI_GPU_CODECS = frozenset({"mpeg4", "h264", "vp8", "vp9", "hevc", "av1"})
# Decodable by NVDEC and DALI, but kept on PyAV on the GPU: DALI's mpeg4 path runs FFmpeg's
# mpeg4_unpack_bframes filter and never flushes it when it seeks (it seeks whenever the next
# wanted frame is more than 10 ahead), so packed B-frames (DivX/Xvid AVI, UCF101) can come out
# shifted. Until a GPU run shows DALI and PyAV agree frame by frame (DECODERS.md).
GPU_HELD_BACK = frozenset({"mpeg4"})
# NVDEC's size limits per codec, (min width, min height, max width, max height), as
# cuvidGetDecoderCaps reports them for 8-bit 4:2:0 on Pascal to Ada; outside them DALI fails
# with "Failed to create video decoder".
NVDEC_SIZES = {
    "h264": (48, 16, 4096, 4096), "mpeg4": (48, 16, 2032, 2032), "vp8": (48, 16, 4096, 4096),
    "hevc": (144, 144, 8192, 8192), "vp9": (128, 128, 8192, 8192), "av1": (128, 128, 8192, 8192),
}
_NVDEC_SINCE_VOLTA = frozenset({"h264", "mpeg4", "vp8", "hevc", "vp9"})
# Codecs NVDEC decodes on every GPU of an architecture, by compute capability (first, last):
# NVIDIA's NVDEC application note (Video Codec SDK 13.0, "NVDEC Hardware Capabilities").
# Codecs present "in select GPUs" only are left out: PyAV is always a correct fallback.
NVDEC_BY_CAPABILITY = (
    ((5, 0), (5, 1), "Maxwell (1st gen)", frozenset({"h264", "mpeg4"})),
    ((5, 2), (5, 3), "Maxwell (2nd gen)", frozenset({"h264", "mpeg4", "vp8"})),
    ((6, 0), (6, 2), "Pascal", frozenset({"h264", "mpeg4", "hevc", "vp9"})),
    ((7, 0), (8, 0), "Volta / Turing / GA100", _NVDEC_SINCE_VOLTA),
    ((8, 6), (8, 9), "Ampere GA10x / Ada", _NVDEC_SINCE_VOLTA | {"av1"}),
    ((9, 0), (9, 0), "Hopper", _NVDEC_SINCE_VOLTA),            # no AV1 decode
    ((10, 0), (12, 1), "Blackwell", _NVDEC_SINCE_VOLTA | {"av1"}),
)


@dataclass(frozen=True)
class DecodeCaps:
    """What DALI's decoder takes on one device: data for ``route_for``."""
    device: str                 # DALI's decoder device: "cpu" or "mixed"
    name: str                   # for reasons: "DALI's CPU decoder", "sm_90 Hopper", ...
    codecs: frozenset[str]      # on "mixed": the codecs this GPU's NVDEC decodes


CPU_CAPS = DecodeCaps("cpu", "DALI's CPU decoder", DALI_CPU_CODECS)


def nvdec_caps(capability: tuple[int, int]) -> DecodeCaps:
    """The NVDEC row for a GPU of compute ``capability`` (major, minor). An architecture the
    table does not know gets the codecs every GPU since Volta decodes."""
    sm = f"sm_{capability[0]}{capability[1]}"
    for first, last, arch, codecs in NVDEC_BY_CAPABILITY:
        if first <= tuple(capability) <= last:
            return DecodeCaps("mixed", f"{sm} {arch}", codecs)
    return DecodeCaps("mixed", f"{sm} (not in the NVDEC table)", _NVDEC_SINCE_VOLTA)


def device_caps(device: str | None) -> DecodeCaps:
    """The capabilities of ``device`` (any spelling ``parse_device`` takes), asked once per
    process and GPU. A GPU this machine does not have decodes nothing on NVDEC."""
    index = cuda_index(device)
    return CPU_CAPS if index is None else _gpu_caps(index)


@functools.cache
def _gpu_caps(index: int) -> DecodeCaps:
    if index >= torch.cuda.device_count():
        return DecodeCaps("mixed", f"cuda:{index} (no such GPU here)", frozenset())
    return nvdec_caps(torch.cuda.get_device_capability(index))


class Route(NamedTuple):
    decoder: str                # "dali" | "pyav"
    reason: str                 # why, for `bombkd probe`


# every "decoder/pipeline device" a clip can be decoded by (``ClipBatch.decoded_by``)
DECODED_BY = ("dali/cpu", "dali/mixed", "pyav/cpu", "pyav/mixed")


def route_for(codec: str, container: str, pix_fmt: str, width: int, height: int,
              caps: DecodeCaps) -> Route:
    """Which decoder takes this stream on a device with ``caps``: "dali" where DALI's decoder
    takes it, else "pyav"; with the reason. Pure: the same inputs give the same route."""
    if pix_fmt not in DALI_PIX_FMTS:
        return Route("pyav", f"pixel format {pix_fmt or '(unknown)'}: DALI decodes 8-bit 4:2:0 "
                             "only")
    if caps.device == "cpu":
        if codec in caps.codecs:
            return Route("dali", f"{codec} on {caps.name}")
        return Route("pyav", f"{codec}: {caps.name} takes {', '.join(sorted(caps.codecs))} only")
    if codec not in DALI_GPU_CODECS:
        return Route("pyav", f"{codec}: DALI's GPU decoder takes "
                             f"{', '.join(sorted(DALI_GPU_CODECS))} only")
    if codec in GPU_HELD_BACK:
        packed = " (packed B-frames, usual in AVI)" if container == "avi" else ""
        return Route("pyav", f"{codec} on the GPU: DALI may shift frames after a seek{packed}; "
                             "PyAV until verified (DECODERS.md)")
    if codec not in caps.codecs:
        return Route("pyav", f"{codec}: NVDEC of {caps.name} does not decode it")
    min_w, min_h, max_w, max_h = NVDEC_SIZES[codec]
    if not (min_w <= width <= max_w and min_h <= height <= max_h):
        return Route("pyav", f"{codec} {width}x{height}: NVDEC takes {min_w}x{min_h} to "
                             f"{max_w}x{max_h}")
    return Route("dali", f"{codec} on NVDEC ({caps.name})")


def check_file(path: str | Path) -> Path:
    """Refuse a missing or empty file before any decoder sees it."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(path, "no such file", "check the path")
    if path.stat().st_size == 0:
        raise VideoError(path, "empty file", "re-download or re-encode it")
    return path.absolute()
