"""Devices and routing, probing, both decoders on every codec and their difference, ClipLoader,
bad files."""
from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bombkd_io.errors import ConfigError, VideoError
from bombkd_io.sampling import sample_indices
from bombkd_io.video import (ClipLoader, VideoInfo, cuda_index, dali_device, decode_clip, is_cuda,
                             parse_device, probe_video, probe_videos, route_for)
from bombkd_io.video.dali import DaliClipDecoder, encoded_sample, raw_sample
from bombkd_io.video.pyav import decode_frames
from bombkd_io.video.resize import resize_crop, resize_crop_tensor, resize_plan

# DALI vs PyAV clip difference per codec (16 frames, 112 px; DECODERS.md): (mean, p99) levels.
# The RGB frames are identical (same swscale flags); only the two resize kernels differ.
TOLERANCE = {"vp9": (0.3, 4), "mjpeg": (0.3, 4), "h264": (0.3, 4), "mpeg4": (0.3, 4)}
CODECS = sorted(TOLERANCE)


@pytest.mark.parametrize("codec", CODECS)
def test_probe_reports_the_stream_and_route(codec_videos, codec):
    info = probe_video(codec_videos[codec])
    assert (info.codec, info.width, info.height, info.fps, info.num_frames) == (
        codec, 160, 120, 25.0, 24)
    assert info.route == ("dali" if codec in ("vp9", "mjpeg") else "pyav")
    assert probe_video(codec_videos[codec], device="gpu").route == "dali"


def test_route_rule():
    assert route_for("vp8", "yuv420p", "cpu") == "dali"
    assert route_for("h264", "yuv420p", "cpu") == "pyav"
    assert route_for("hevc", "yuv420p", "gpu") == "dali"
    assert route_for("mjpeg", "yuvj422p", "cpu") == "pyav"      # DALI assumes 4:2:0
    assert route_for("prores", "yuv422p10le", "gpu") == "pyav"


@pytest.mark.parametrize("codec", ["vp9", "mjpeg"])
def test_probed_frame_count_is_what_dali_and_pyav_decode(codec_videos, bad_videos, codec):
    paths = [codec_videos[codec]] + ([bad_videos["truncated"]] if codec == "vp9" else [])
    for path in paths:
        info = probe_video(path)
        with av.open(str(path)) as container:
            decoded = sum(1 for _ in container.decode(video=0))
        decoder = DaliClipDecoder(size=32, batch_size=1, num_threads=1)
        last = decoder.run([encoded_sample(str(path), np.arange(info.num_frames))])
        assert decoded == info.num_frames and last.shape[1] == info.num_frames
        assert last[0, -1].float().mean() > 5        # the last frame is a real one, not padding


@pytest.mark.parametrize("codec", ["vp9", "mjpeg"])
def test_pyav_rgb_frames_are_bit_identical_to_dali(codec_videos, codec):
    """Before any resize: PyAV (with DALI's swscale flags) and DALI's decoder agree exactly."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, exec_async=False,
                  exec_pipelined=False)
    def native():
        data = fn.external_source(name="data", dtype=types.UINT8, ndim=1)
        return fn.decoders.video(data, device="cpu")

    pipe = native()
    pipe.build()
    pipe.feed_input("data", [np.fromfile(codec_videos[codec], dtype=np.uint8)])
    (out,) = pipe.run()
    dali = np.array(out.as_tensor())[0]                                  # [F, H, W, 3]
    pyav = decode_frames(codec_videos[codec], np.arange(dali.shape[0]))  # [F, H, W, 3]
    assert np.array_equal(dali, pyav)


@pytest.mark.parametrize("codec", CODECS)
def test_dali_and_pyav_clips_agree_within_tolerance(codec_videos, codec):
    dali = decode_clip(codec_videos[codec], frames=16, size=112, backend="dali")
    pyav = decode_clip(codec_videos[codec], frames=16, size=112, backend="pyav")
    assert dali.shape == pyav.shape == (16, 112, 112, 3) and dali.dtype == np.uint8
    diff = np.abs(dali.astype(np.int16) - pyav.astype(np.int16))
    mean, p99 = TOLERANCE[codec]
    assert diff.mean() <= mean and np.percentile(diff, 99) <= p99, (diff.mean(), diff.max())


def test_short_video_repeats_frames_by_the_sampling_rule(bad_videos):
    info = probe_video(bad_videos["truncated"])
    assert info.num_frames < 16
    idx = sample_indices(info.num_frames, 16)
    clip = decode_clip(bad_videos["truncated"], frames=16, size=64)
    for a, b in zip(range(15), range(1, 16)):
        if idx[a] == idx[b]:
            assert np.array_equal(clip[a], clip[b])
        else:
            assert not np.array_equal(clip[a], clip[b])     # a spinning shape: frames differ


@pytest.mark.parametrize("kind", ["missing", "empty", "text", "garbage", "header_only",
                                  "no_frame", "audio_only"])
def test_bad_files_raise_video_error_naming_the_file(bad_videos, kind):
    path = bad_videos[kind]
    for call in (lambda: probe_video(path), lambda: decode_clip(path, backend="dali"),
                 lambda: decode_clip(path, backend="pyav")):
        with pytest.raises(VideoError) as err:
            call()
        assert str(path) in str(err.value)


def test_probe_videos_skips_and_records(bad_videos, codec_videos):
    paths = [codec_videos["vp9"], bad_videos["empty"], bad_videos["no_frame"]]
    ok, failed = probe_videos(paths)
    assert [i.codec for i in ok] == ["vp9"]
    assert failed == [(str(bad_videos["empty"]), "empty file"),
                      (str(bad_videos["no_frame"]), "no decodable video frame")]
    with pytest.raises(VideoError, match="empty file"):
        probe_videos(paths, on_error="raise")


def test_clip_loader_matches_decode_clip_across_routes(codec_videos):
    infos, _ = probe_videos([codec_videos[c] for c in CODECS])   # DALI and PyAV routes mixed
    loader = ClipLoader(infos, frames=8, size=64, batch_size=3, num_threads=1)
    batches = list(loader.batches([[0, 1, 2], [3]]))
    assert [b.positions for b in batches] == [[0, 1, 2], [3]]
    assert batches[0].clips.shape == (3, 8, 64, 64, 3) and batches[0].clips.dtype == torch.uint8
    for batch in batches:
        for pos, clip, idx in zip(batch.positions, batch.clips, batch.frame_indices):
            assert np.array_equal(idx, sample_indices(infos[pos].num_frames, 8))
            expected = decode_clip(infos[pos].path, frames=8, size=64)
            assert np.array_equal(clip.numpy(), expected)


def test_clip_loader_records_failures_and_recovers(codec_videos, bad_videos):
    good = probe_video(codec_videos["vp9"])
    # Files that changed after probing: DALI itself meets the corrupt bytes (no hang, no crash).
    garbage = VideoInfo(str(bad_videos["garbage"]), "vp9", 160, 120, 25.0, 24, "dali", "yuv420p")
    gone = VideoInfo(str(bad_videos["missing"]), "h264", 160, 120, 25.0, 24, "pyav", "yuv420p")
    loader = ClipLoader([good, garbage, gone, good], frames=4, size=32, batch_size=4,
                        num_threads=1)
    first, second = loader.batches([[0, 1, 2, 3], [3, 0]])
    assert first.positions == [0, 3] and first.clips.shape[0] == 2
    assert [(p, r.split(":")[0]) for p, r in first.failed] == [(2, "no such file"), (1, "DALI")]
    assert second.positions == [3, 0] and not second.failed      # the pipeline was rebuilt


def test_clip_loader_runs_ahead_in_a_thread_and_stops_early(sample_root):
    infos, _ = probe_videos(sorted(sample_root.glob("*/*.webm")))
    loader = ClipLoader(infos, frames=4, size=32, batch_size=2, num_threads=1, prefetch=1)
    stream = loader.batches([[i, i + 1] for i in range(0, 18, 2)])
    first = next(stream)
    assert any(t.name == "bombkd-clip-decode" for t in threading.enumerate())
    stream.close()                                   # the consumer stops after one batch
    assert first.positions == [0, 1]
    assert not any(t.name == "bombkd-clip-decode" for t in threading.enumerate())
    with pytest.raises(IndexError):                  # an error in the thread reaches the consumer
        list(loader.batches([[0], [99]]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (DALI mixed decoder)")
def test_gpu_pipeline_matches_cpu(codec_videos):
    infos, _ = probe_videos([codec_videos[c] for c in CODECS], device="gpu")
    assert all(i.route == "dali" for i in infos)
    gpu, cpu = (next(ClipLoader(infos, frames=8, size=64, batch_size=4, device=d)
                     .batches([[0, 1, 2, 3]])) for d in ("gpu", "cpu"))
    assert gpu.clips.is_cuda
    diff = (gpu.clips.cpu().short() - cpu.clips.short()).abs().float()
    assert diff.mean() < 3.0


def ramp_frames(frames: int = 2, height: int = 120, width: int = 160) -> np.ndarray:
    """uint8 [T, H, W, 3] whose value is the column number: a crop offset shows as a level shift."""
    ramp = np.broadcast_to(np.arange(width, dtype=np.uint8)[None, :, None], (height, width, 3))
    return np.ascontiguousarray(np.broadcast_to(ramp, (frames, height, width, 3)))


def test_resize_rounds_and_crops_like_dali():
    # 160x120 -> 112: width 149.33 -> 149, crop offset (149 - 112) / 2 = 18.5 -> 19 (half up)
    assert resize_plan(120, 160, 112) == (112, 149, 0, 19)
    assert resize_plan(160, 120, 112) == (149, 112, 19, 0)
    frames = ramp_frames()
    decoder = DaliClipDecoder(size=112, batch_size=1, num_threads=1)
    dali = decoder.run([raw_sample(frames, np.arange(2))])[0].numpy().astype(float)
    decoder.close()
    ours = resize_crop(frames, 112).astype(float)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)                    # [T, 3, H, W]
    resized = F.interpolate(x, size=(112, 149), mode="bilinear", antialias=True)
    floor = resized[:, :, :, 18:130].permute(0, 2, 3, 1).numpy().astype(float)  # offset 18
    inner = slice(8, -8)  # away from the borders, where the two filters' edge handling differs
    assert np.abs(ours - dali)[:, :, inner].mean() < 0.3
    assert np.abs(floor - dali)[:, :, inner].mean() > 0.8           # one column off: ~1.07 levels


def test_resize_tensor_keeps_dtype_and_skips_an_exact_size():
    x = torch.from_numpy(ramp_frames()).permute(0, 3, 1, 2)             # [T, 3, 120, 160]
    assert resize_crop_tensor(x, 112).dtype == torch.uint8
    assert resize_crop_tensor(x.float(), 112).shape == (2, 3, 112, 112)
    square = x[:, :, :, :120]
    assert torch.equal(resize_crop_tensor(square, 120), square)


def test_parse_device_gives_torchs_name_or_names_the_argument():
    gpus = torch.cuda.device_count()
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    for spec, want in ((None, auto), ("auto", auto), ("cpu", "cpu"), ("gpu", "cuda"),
                       ("cuda", "cuda")):
        assert parse_device(spec) == want
    assert [is_cuda(d) for d in ("cpu", "gpu", "cuda")] == [False, True, True]
    for bad in ("tpu", "CPU", "mixed", "cuda:x", "cuda:", "cuda:-1", "cuda0", ""):
        with pytest.raises(ConfigError, match=rf"^--loader-device {bad!r}: expected auto, cpu, "
                                              "gpu, cuda or cuda:N$"):
            parse_device(bad, "--loader-device")
    have = f"{gpus} GPU\\(s\\), cuda:0 to cuda:{gpus - 1}" if gpus else "no GPU; use cpu"
    with pytest.raises(ConfigError, match=rf"^--device 'cuda:{gpus}': this machine has {have}$"):
        parse_device(f"cuda:{gpus}")
    if gpus:
        assert parse_device(f"cuda:{gpus - 1}") == f"cuda:{gpus - 1}"


def test_importing_the_device_parser_loads_no_decoder():
    code = ("import sys, bombkd_io.video, bombkd_train.runtime; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'av', 'nvidia'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


def test_device_index_is_parsed_on_the_callers_thread():
    assert (cuda_index("cpu"), dali_device("cpu")) == (None, "cpu")
    if torch.cuda.device_count() >= 2:
        assert cuda_index("cuda:1") == 1 and dali_device("cuda:1") == "mixed"
    if not torch.cuda.is_available():
        assert cuda_index("gpu") == 0 and dali_device("gpu") == "mixed"
        # no GPU is touched before the first run: the index is only recorded
        loader = ClipLoader([], frames=4, size=32, batch_size=1, device="gpu")
        assert (loader.device, loader.decoder.device, loader.decoder.device_id) == (
            "cuda", "mixed", 0)
        loader.close()
    assert DaliClipDecoder(size=32, batch_size=1, device="cpu").device_id is None


def test_clip_loader_close_releases_pipeline_and_threads(codec_videos):
    infos, _ = probe_videos([codec_videos["vp9"], codec_videos["h264"]])   # DALI and PyAV routes
    with ClipLoader(infos, frames=4, size=32, batch_size=2, num_threads=1) as loader:
        assert loader.decode_batch([0, 1]).positions == [0, 1]
        assert loader.decoder._pipe is not None
        threads = list(loader._pool._threads)
    assert loader.decoder._pipe is None and threads and not any(t.is_alive() for t in threads)
    with pytest.raises(RuntimeError, match="shutdown"):
        loader.decode_batch([0])


def test_probe_videos_checks_on_error(codec_videos):
    with pytest.raises(ConfigError, match="on_error must be one of"):
        probe_videos([codec_videos["vp9"]], on_error="warn")


def test_probe_index_keeps_readable_positions_in_order_and_refuses_an_unreadable_split(
        tmp_path, codec_videos, bad_videos):
    import shutil

    from bombkd_io.datasets import index_dataset
    from bombkd_io.errors import DatasetError
    from bombkd_io.video import probe_index

    for name, src in (("a_good", codec_videos["vp9"]), ("b_bad", bad_videos["garbage"]),
                      ("c_good", codec_videos["mjpeg"])):
        (tmp_path / "videos" / "Cls").mkdir(parents=True, exist_ok=True)
        shutil.copy(src, tmp_path / "videos" / "Cls" / f"{name}{src.suffix}")
    index = index_dataset("folder", tmp_path / "videos", "all")
    names = [p.rsplit("/", 1)[-1].split(".")[0] for p in (it.path for it in index.items)]
    ok, infos, failed = probe_index(index, range(len(index.items)))
    assert [names[i] for i in ok] == ["a_good", "c_good"]
    assert [i.path for i in infos] == [index.items[i].path for i in ok]
    assert [f[0] for f in failed] == [index.items[names.index("b_bad")].path]
    with pytest.raises(DatasetError, match="none of the 1 .*can be read.*b_bad"):
        probe_index(index, [names.index("b_bad")])
