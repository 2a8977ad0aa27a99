"""Devices and routing, probing, both decoders on every codec and their difference, ClipLoader,
bad files."""
from __future__ import annotations

import subprocess
import sys
import threading

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bombkd_io.errors import ConfigError, VideoError
from bombkd_io.sampling import sample_indices
from bombkd_io.video import (ClipLoader, VideoInfo, cuda_index, dali_device, decode_clip, is_cuda,
                             parse_device, probe_video, probe_videos)
from bombkd_io.video.compare import CPU_TOLERANCE, GPU_TOLERANCE, clip_difference
from bombkd_io.video.dali import DaliClipDecoder, DaliRunError, encoded_sample, raw_sample
from bombkd_io.video.pyav import decode_frames
from bombkd_io.video.resize import resize_crop, resize_crop_tensor, resize_plan
from places import REPO

CODECS = ["h264", "mjpeg", "mpeg4", "vp9"]


CONTAINER = {".webm": "matroska,webm", ".mp4": "mov,mp4,m4a,3gp,3g2,mj2", ".avi": "avi"}


@pytest.mark.parametrize("codec", CODECS)
def test_probe_reports_the_stream_and_route(codec_videos, codec):
    info = probe_video(codec_videos[codec], device="cpu")
    assert (info.codec, info.width, info.height, info.fps, info.num_frames) == (
        codec, 160, 120, 25.0, 24)
    assert info.container == CONTAINER[codec_videos[codec].suffix] and info.device == "cpu"
    assert (info.route, info.reason) == (("dali", f"{codec} on DALI's CPU decoder")
                                         if codec in ("vp9", "mjpeg") else
                                         ("pyav", f"{codec}: DALI's CPU decoder takes mjpeg, "
                                                  "vp8, vp9 only"))


def test_probe_names_the_codec_not_pyavs_decoder_and_routes_every_gpu_codec(gpu_videos):
    from bombkd_io.video import nvdec_caps, route_for

    infos, failed = probe_videos(list(gpu_videos.values()))
    assert not failed
    codecs = [i.codec for i in infos]       # PyAV decodes AV1 with "libdav1d"
    assert codecs == ["vp8", "vp9", "h264", "hevc", "av1", "mpeg4", "mjpeg"]
    assert [i.route for i in infos] == ["dali", "dali", "pyav", "pyav", "pyav", "pyav", "dali"]
    ada = [route_for(i.codec, i.container, i.pix_fmt, i.width, i.height, nvdec_caps((8, 9)))
           for i in infos]
    assert [r.decoder for r in ada] == ["dali"] * 5 + ["pyav"] * 2


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


def test_a_frame_past_the_end_raises_instead_of_coming_back_black(codec_videos):
    """DALI pads an index past the end with a frame of zeros unless pad_mode="none"."""
    decoder = DaliClipDecoder(size=32, batch_size=1, num_threads=1)
    last = decoder.run([encoded_sample(str(codec_videos["vp9"]), np.array([0, 23]))])
    assert last[0, 1].float().mean() > 5
    with pytest.raises(DaliRunError, match="out-of-bounds frame index 24 .* with 24 frames"):
        decoder.run([encoded_sample(str(codec_videos["vp9"]), np.array([0, 23, 24]))])
    # a VideoInfo that claims more frames than the file has: recorded as failed, no clip
    info = probe_video(codec_videos["vp9"])
    stale = VideoInfo(info.path, "vp9", 160, 120, 25.0, 30, "dali", "yuv420p")
    with ClipLoader([stale, info], frames=16, size=32, batch_size=2, num_threads=1) as loader:
        batch = loader.decode_batch([0, 1])
    assert batch.positions == [1] and batch.decoded_by == ["dali/cpu"]
    first_past = min(i for i in sample_indices(30, 16) if i >= 24)
    assert [(p, r.split(" for pad_mode")[0]) for p, r in batch.failed] == [
        (0, f"DALI: Unexpected out-of-bounds frame index {first_past}")]


def test_edit_list_frames_are_counted_as_dali_and_pyav_decode_them(edit_list_mp4):
    with av.open(str(edit_list_mp4)) as container:
        stamps = [p.pts for p in container.demux(video=0) if p.size]
    with av.open(str(edit_list_mp4)) as container:
        decoded = sum(1 for _ in container.decode(video=0))
    assert len(stamps) == 24 and sum(t < 0 for t in stamps) == 3     # the edit list is there
    info = probe_video(edit_list_mp4)
    assert (info.num_frames, decoded, info.route, info.warnings) == (21, 21, "dali", ())
    # DALI's bound comes from the header (24 frames): asking for frame 21 is no error even with
    # pad_mode="none", and what comes back is no frame of the video (zeros, or whatever its
    # buffer held), which is why the probe's count must be the decodable one.
    decoder = DaliClipDecoder(size=32, batch_size=1, num_threads=1)
    assert decoder.run([encoded_sample(info.path, np.array([20, 21]))]).shape[1] == 2
    with pytest.raises(DaliRunError, match="out-of-bounds frame index 24 .* with 24 frames"):
        decoder.run([encoded_sample(info.path, np.array([20, 24]))])
    dali = decode_clip(edit_list_mp4, frames=16, size=112, backend="dali")
    pyav = decode_clip(edit_list_mp4, frames=16, size=112, backend="pyav")
    assert dali.reshape(16, -1).max(axis=1).min() > 0                  # no black frame
    diff = clip_difference(dali, pyav)
    assert diff.within(*CPU_TOLERANCE), str(diff)


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
    diff = clip_difference(dali, pyav)
    assert diff.within(*CPU_TOLERANCE), str(diff)


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


NO_CUDA = "needs CUDA (DALI's mixed decoder)"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_gpu_routes_match_pyav_frame_by_frame(gpu_videos):
    """Every codec on the GPU, whichever route it takes: the same frames as PyAV, in order
    (each frame nearest PyAV's frame at the same index), within the GPU tolerance."""
    infos, failed = probe_videos(list(gpu_videos.values()), device="gpu")
    assert not failed
    routes = {i.codec: i.route for i in infos}
    assert routes["mjpeg"] == routes["mpeg4"] == "pyav" and routes["h264"] == "dali"
    with ClipLoader(infos, frames=16, size=112, batch_size=len(infos), device="gpu") as loader:
        batch = loader.decode_batch(list(range(len(infos))))
    assert not batch.failed and batch.clips.is_cuda
    for pos, clip, by in zip(batch.positions, batch.clips.cpu().numpy(), batch.decoded_by):
        assert by == f"{infos[pos].route}/mixed"
        pyav = decode_clip(infos[pos].path, frames=16, size=112, backend="pyav")
        diff = clip_difference(clip, pyav)
        assert diff.within(*GPU_TOLERANCE), (infos[pos].codec, str(diff))


def test_clip_difference_finds_a_shifted_frame(codec_videos):
    clip = decode_clip(codec_videos["vp9"], frames=8, size=64, backend="pyav")
    assert clip_difference(clip, clip).within(0, 0)
    shifted = clip.copy()
    shifted[3] = clip[4]                                  # frame 4 in place of frame 3
    diff = clip_difference(shifted, clip)
    assert diff.out_of_order == (3,) and not diff.within(255, 255)
    with pytest.raises(ValueError, match="different shapes"):
        clip_difference(clip[:4], clip)


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
                         cwd=REPO)
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
