"""Where a video is decoded: devices, the codec -> decoder rule, and the file check before any
decoder opens a file.

``dali_device`` / ``cuda_index`` map a user's device to DALI's device and GPU number; ``route_for``
says whether DALI or PyAV decodes a stream there. Imports neither DALI nor PyAV.
"""
from __future__ import annotations

from pathlib import Path

from bombkd_io.errors import VideoError

# Codecs DALI's fn.decoders.video decodes per device (its docs, and verified on CPU).
DALI_CODECS = {
    "cpu": frozenset({"vp8", "vp9", "mjpeg"}),
    "mixed": frozenset({"vp8", "vp9", "mjpeg", "h264", "hevc", "mpeg4", "av1"}),
}
# DALI assumes 8-bit 4:2:0; anything else (4:2:2 camera MJPEG, 10-bit) goes through PyAV.
DALI_PIX_FMTS = frozenset({"yuv420p", "yuvj420p"})


def dali_device(device: str | None) -> str:
    """User device ("cpu", "gpu", "cuda", "mixed" or None = auto) -> DALI decoder device."""
    if device is None:
        import torch
        return "mixed" if torch.cuda.is_available() else "cpu"
    if device in ("gpu", "cuda", "mixed") or device.startswith("cuda:"):
        return "mixed"
    if device == "cpu":
        return "cpu"
    raise ValueError(f"unknown device {device!r}; expected 'cpu', 'gpu' or None (auto)")


def cuda_index(device: str | None) -> int | None:
    """The CUDA device a "mixed" pipeline uses: ``N`` of "cuda:N", else torch's current device;
    None on the CPU. Call it on the caller's thread: torch's current device is per thread."""
    if dali_device(device) == "cpu":
        return None
    import torch
    if device is not None and device.startswith("cuda:"):
        index = device[len("cuda:"):]
        if not index.isdigit():
            raise ValueError(f"device {device!r}: expected 'cuda:N' with a GPU number N")
        count = torch.cuda.device_count() if torch.cuda.is_available() else None
        if count is not None and int(index) >= count:
            raise ValueError(f"device {device!r}: this machine has {count} GPU(s), "
                             f"cuda:0 to cuda:{count - 1}")
        return int(index)
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
