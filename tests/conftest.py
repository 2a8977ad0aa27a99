"""Shared fixtures: real encoded videos, made once per test session.

- ``sample_root``   Path: ``make_sample_data(tmp, classes=6, per_class=3, codec="vp9", seed=0)``,
                    18 VP9 clips in UCF101 layout (train 12 / test 6 of split 1).
- ``small_root``    Path: 3 classes x 4 VP9 clips in UCF101 layout; the train split has 9, the
                    one at index position ``BROKEN`` overwritten with garbage (featurize tests).
- ``codec_videos``  dict codec -> Path: one clip per codec sample-data writes
                    (vp9 .webm, h264 .mp4, mpeg4 .avi, mjpeg .avi), 24 frames, 160x120.
- ``bad_videos``    dict kind -> Path: ``missing``, ``empty``, ``text`` (not a video),
                    ``garbage`` (random bytes, .webm), ``header_only`` (the first 200 bytes of a
                    webm), ``truncated`` (the first 60% of a webm), ``audio_only`` (.wav).
- ``edit_list_mp4`` Path: the same 24 frames as ``codec_videos``, VP9 in MP4, whose edit list
                    cuts the first 3: 24 packets stored, 21 frames shown.
- ``gpu_videos``    dict codec -> Path: 24 frames, 176x144 (inside NVDEC's sizes for every
                    codec), of every codec DALI's GPU decoder takes, plus mjpeg; mpeg4 is
                    ``mpeg4_bframes`` (B-frames in AVI, not packed).
"""
from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

from bombkd_io.datasets import index_dataset
from bombkd_io.sample_data import (CODECS, GPU_CODECS, encode_video, make_codec_clips,
                                   make_sample_data, spinning_clip)

BROKEN = 4  # small_root: index position (train split) of the video overwritten with garbage


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    return make_sample_data(tmp_path_factory.mktemp("sample") / "ucf", classes=6, per_class=3,
                            codec="vp9", seed=0)


@pytest.fixture(scope="session")
def small_root(tmp_path_factory) -> Path:
    root = make_sample_data(tmp_path_factory.mktemp("videos"), classes=3, per_class=4, seed=0)
    broken = Path(index_dataset("ucf101", root, "train").items[BROKEN].path)
    broken.write_bytes(b"\x1aE\xdf\xa3 this is not a video" * 10)
    return Path(root)


@pytest.fixture(scope="session")
def codec_videos(tmp_path_factory) -> dict[str, Path]:
    return make_codec_clips(tmp_path_factory.mktemp("codecs"), list(CODECS))


@pytest.fixture(scope="session")
def bad_videos(tmp_path_factory, codec_videos) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("bad")
    good = codec_videos["vp9"].read_bytes()
    files = {
        "empty": b"",
        "text": b"this is not a video\n" * 50,
        "garbage": np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes(),
        "header_only": good[:200],
        "truncated": good[: int(len(good) * 0.6)],
    }
    ext = {"text": ".txt"}
    paths = {"missing": out / "missing.webm"}
    for kind, data in files.items():
        paths[kind] = out / f"{kind}{ext.get(kind, '.webm')}"
        paths[kind].write_bytes(data)
    mp4 = bytearray(codec_videos["h264"].read_bytes())
    start, end = mp4.index(b"mdat") + 4, mp4.index(b"moov") - 4     # the frame data, zeroed
    mp4[start:end] = bytes(end - start)
    paths["no_frame"] = out / "no_frame.mp4"
    paths["no_frame"].write_bytes(bytes(mp4))
    paths["audio_only"] = out / "audio_only.wav"
    with wave.open(str(paths["audio_only"]), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes(np.zeros(8000, np.int16).tobytes())
    return paths


@pytest.fixture(scope="session")
def edit_list_mp4(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("editlist") / "edit_list_vp9.mp4"
    encode_video(spinning_clip(), path, "vp9", fps=25, first_pts=-3)
    return path


@pytest.fixture(scope="session")
def gpu_videos(tmp_path_factory) -> dict[str, Path]:
    return make_codec_clips(tmp_path_factory.mktemp("gpu_codecs"), GPU_CODECS, 176, 144)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 (a child process), behind a counting proxy; stopped after."""
    from s3_server import S3Server

    server = S3Server(tmp_path_factory.mktemp("moto") / "moto.log")
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The S3 server, with this process's AWS settings pointing at it alone."""
    import fsspec

    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    fsspec.get_filesystem_class("s3").clear_instance_cache()  # credentials of an earlier test
    s3_server.proxy.reset()
    s3_server.proxy.cut_after(0, 0)
    yield s3_server
    s3_server.proxy.cut_after(0, 0)
    fsspec.get_filesystem_class("s3").clear_instance_cache()
