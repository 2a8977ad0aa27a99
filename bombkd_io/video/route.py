"""Where a video is decoded: the one parser of device strings, the codec -> decoder rule, and
the file check before any decoder opens a file.

``parse_device`` reads ``--device`` for every command (``is_cuda``, ``dali_device`` and
``cuda_index`` derive from it); ``route_for`` says whether DALI or PyAV decodes a stream on that
device. Imports neither DALI nor PyAV, so ``bombkd_train`` uses it freely.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from bombkd_io.errors import ConfigError, VideoError

# What --device takes, everywhere: "auto" picks the GPU where torch sees one.
DEVICES = "auto, cpu, gpu, cuda or cuda:N"

# Codecs DALI's fn.decoders.video decodes per device (its docs, and verified on CPU).
DALI_CODECS = {
    "cpu": frozenset({"vp8", "vp9", "mjpeg"}),
    "mixed": frozenset({"vp8", "vp9", "mjpeg", "h264", "hevc", "mpeg4", "av1"}),
}
# DALI assumes 8-bit 4:2:0; anything else (4:2:2 camera MJPEG, 10-bit) goes through PyAV.
DALI_PIX_FMTS = frozenset({"yuv420p", "yuvj420p"})


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


def route_for(codec: str, pix_fmt: str, device: str | None) -> str:
    """"dali" where DALI's decoder takes the stream on this device, else "pyav"."""
    ok = codec in DALI_CODECS[dali_device(device)] and pix_fmt in DALI_PIX_FMTS
    return "dali" if ok else "pyav"


def check_file(path: str | Path) -> Path:
    """Refuse a missing or empty file before any decoder sees it."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(path, "no such file", "check the path")
    if path.stat().st_size == 0:
        raise VideoError(path, "empty file", "re-download or re-encode it")
    return path.absolute()
