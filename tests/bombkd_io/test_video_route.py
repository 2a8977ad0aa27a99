"""The routing table: stream (codec, container, pixel format, size) x device capabilities ->
decoder and reason, with the capabilities passed as data (no GPU needed)."""
from __future__ import annotations

import pytest
import torch

from bombkd_io.video import DecodeCaps, device_caps, nvdec_caps, route_for
from bombkd_io.video.route import CPU_CAPS

NO_GPU, ADA, HOPPER = CPU_CAPS, nvdec_caps((8, 9)), nvdec_caps((9, 0))

# codec, container, pixel format -> route with no GPU, on Ada, on Hopper (a 176x144 stream)
TABLE = [
    ("vp8", "matroska,webm", "yuv420p", "dali", "dali", "dali"),
    ("vp9", "matroska,webm", "yuv420p", "dali", "dali", "dali"),
    ("mjpeg", "avi", "yuvj420p", "dali", "pyav", "pyav"),     # DALI's GPU decoder lacks MJPEG
    ("h264", "mov,mp4,m4a,3gp,3g2,mj2", "yuv420p", "pyav", "dali", "dali"),
    ("hevc", "mov,mp4,m4a,3gp,3g2,mj2", "yuv420p", "pyav", "dali", "dali"),
    ("mpeg4", "avi", "yuv420p", "pyav", "pyav", "pyav"),      # held back on the GPU
    ("av1", "matroska,webm", "yuv420p", "pyav", "dali", "pyav"),  # Hopper's NVDEC: no AV1
    ("mjpeg", "avi", "yuvj422p", "pyav", "pyav", "pyav"),     # DALI: 4:2:0 only
    ("h264", "mov,mp4,m4a,3gp,3g2,mj2", "yuv420p10le", "pyav", "pyav", "pyav"),
    ("prores", "mov,mp4,m4a,3gp,3g2,mj2", "yuv422p10le", "pyav", "pyav", "pyav"),
]


@pytest.mark.parametrize("codec, container, pix_fmt, cpu, ada, hopper", TABLE)
def test_route_table(codec, container, pix_fmt, cpu, ada, hopper):
    got = [route_for(codec, container, pix_fmt, 176, 144, caps).decoder
           for caps in (NO_GPU, ADA, HOPPER)]
    assert got == [cpu, ada, hopper]


@pytest.mark.parametrize("caps, codec, container, pix_fmt, words", [
    (NO_GPU, "h264", "mp4", "yuv420p", "DALI's CPU decoder takes mjpeg, vp8, vp9 only"),
    (ADA, "mjpeg", "avi", "yuvj420p", "GPU decoder takes av1, h264, hevc, mpeg4, vp8, vp9 only"),
    (ADA, "mpeg4", "avi", "yuv420p", "packed B-frames, usual in AVI"),
    (HOPPER, "av1", "mp4", "yuv420p", "NVDEC of sm_90 Hopper does not decode it"),
    (ADA, "av1", "mp4", "yuv420p", "av1 on NVDEC (sm_89 Ampere GA10x / Ada)"),
    (HOPPER, "h264", "mp4", "yuv422p", "pixel format yuv422p: DALI decodes 8-bit 4:2:0 only"),
])
def test_route_says_why(caps, codec, container, pix_fmt, words):
    assert words in route_for(codec, container, pix_fmt, 176, 144, caps).reason


@pytest.mark.parametrize("codec, width, height, route", [
    ("hevc", 144, 144, "dali"), ("hevc", 176, 128, "pyav"), ("hevc", 128, 176, "pyav"),
    ("vp9", 160, 128, "dali"), ("vp9", 160, 120, "pyav"), ("h264", 48, 16, "dali"),
    ("h264", 32, 32, "pyav"), ("h264", 4096, 2160, "dali"), ("h264", 8192, 4320, "pyav"),
])
def test_nvdec_size_limits_route_to_pyav(codec, width, height, route):
    got = route_for(codec, "mp4", "yuv420p", width, height, ADA)
    assert got.decoder == route, got.reason
    if route == "pyav":
        assert f"{codec} {width}x{height}: NVDEC takes" in got.reason
    # sizes do not matter to DALI's CPU decoder
    assert route_for("vp9", "webm", "yuv420p", width, height, NO_GPU).decoder == "dali"


def test_capability_table_by_compute_capability():
    av1 = {cc: "av1" in nvdec_caps(cc).codecs
           for cc in ((6, 1), (7, 0), (7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0))}
    assert [cc for cc, yes in av1.items() if yes] == [(8, 6), (8, 9), (10, 0), (12, 0)]
    assert "vp8" not in nvdec_caps((6, 1)).codecs         # Pascal: in select GPUs only
    assert nvdec_caps((9, 0)).name == "sm_90 Hopper"
    future = nvdec_caps((15, 0))
    assert future.name == "sm_150 (not in the NVDEC table)" and "av1" not in future.codecs
    assert future.codecs == nvdec_caps((7, 5)).codecs


def test_device_caps_are_asked_once_per_device():
    assert device_caps("cpu") is CPU_CAPS
    gpu = device_caps("cuda:0") if torch.cuda.is_available() else device_caps("gpu")
    assert gpu.device == "mixed" and gpu is device_caps("gpu")
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        assert gpu == nvdec_caps((major, minor))
    else:       # a GPU this machine lacks decodes nothing: every stream goes to PyAV
        assert gpu == DecodeCaps("mixed", "cuda:0 (no such GPU here)", frozenset())
        assert route_for("h264", "mp4", "yuv420p", 176, 144, gpu).decoder == "pyav"
