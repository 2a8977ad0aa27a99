"""A small, learnable action dataset, generated procedurally and written in the UCF101 layout.

Each class is one coloured shape doing one motion (slide, spin, zoom, bounce, ...), so classes
differ by appearance and by motion; each clip varies length (some shorter than 16 frames), size,
fps, background and speed. Encoding is pinned (one encoder thread, bit-exact muxing), so the same
seed writes byte-identical files.

    OUT/<Class>/v_<Class>_gNN_cNN.<ext>
    OUT/ucfTrainTestlist/{classInd.txt, trainlist01.txt, testlist01.txt}
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bombkd_io.atomic import atomic_path
from bombkd_io.errors import needs_extra

CODECS = ("vp9", "h264", "mpeg4", "mjpeg")
# codec -> (container extension, encoder, pixel format, encoder options)
_ENCODERS = {
    "vp9": (".webm", "libvpx-vp9", "yuv420p",
            {"deadline": "realtime", "cpu-used": "8", "row-mt": "0", "crf": "20", "b": "0"}),
    # No macroblock-tree / rate lookahead: with them libx264 output varied from run to run.
    "h264": (".mp4", "libx264", "yuv420p",
             {"preset": "veryfast", "crf": "18", "x264-params": "mbtree=0:psy=0:rc-lookahead=0"}),
    "mpeg4": (".avi", "mpeg4", "yuv420p", {"qscale": "3"}),
    "mjpeg": (".avi", "mjpeg", "yuvj420p", {"qscale": "3"}),
}
# Further streams for the decoder tests (every codec DALI's GPU decoder takes), not offered by
# `sample-data`: MPEG-4 with B-frames in AVI like UCF101's (FFmpeg's encoder cannot write them
# packed, DivX-style), VP8, HEVC and AV1.
TEST_ENCODERS = {
    "mpeg4_bframes": (".avi", "mpeg4", "yuv420p", {"qscale": "3", "bf": "2"}),
    "vp8": (".webm", "libvpx", "yuv420p",
            {"deadline": "realtime", "cpu-used": "8", "crf": "10", "b": "1M"}),
    "hevc": (".mp4", "libx265", "yuv420p",
             {"preset": "ultrafast", "crf": "18",
              "x265-params": "log-level=error:pools=none:frame-threads=1"}),
    "av1": (".mkv", "libsvtav1", "yuv420p", {"preset": "12", "crf": "30"}),
}
# Every codec DALI's GPU decoder takes, plus MJPEG, which it does not.
GPU_CODECS = ["vp8", "vp9", "h264", "hevc", "av1", "mpeg4_bframes", "mjpeg"]
MOTIONS = ("SlideRight", "SlideLeft", "SlideUp", "SlideDown", "Spin", "ZoomIn", "ZoomOut", "Bounce")
SHAPES = ("Disc", "Box", "Bar", "Cross")
SIZES = ((128, 96), (144, 108), (160, 120), (176, 144))   # (width, height), all even
FPS = (15, 24, 25, 30)
MIN_FRAMES, MAX_FRAMES = 10, 48
TEST_FRACTION = 0.3      # like UCF101, the lowest-numbered groups form the test list


@dataclass(frozen=True)
class ClassSpec:
    name: str
    motion: str
    shape: str
    rgb: tuple[int, int, int]


def class_specs(classes: int) -> list[ClassSpec]:
    """Class ``c``: motion ``c % 8``, shape ``c % 4``, and a hue of its own (strong colour cue)."""
    specs, seen = [], set()
    for c in range(classes):
        motion, shape = MOTIONS[c % len(MOTIONS)], SHAPES[c % len(SHAPES)]
        name = f"{motion}{shape}"
        if name in seen:            # more classes than motion x shape pairs: number the repeats
            name = f"{name}{c}"
        seen.add(name)
        r, g, b = colorsys.hsv_to_rgb(c / classes, 0.9, 1.0)
        specs.append(ClassSpec(name, motion, shape, (int(r * 255), int(g * 255), int(b * 255))))
    return specs


def _trajectory(motion: str, p: float, speed: float) -> tuple[float, float, float, float]:
    """Object centre (x, y in [0, 1]), angle (rad) and scale at progress ``p`` in [0, 1]."""
    d = 0.55 * speed * (p - 0.5)            # signed travel about the centre
    table = {
        "SlideRight": (0.5 + d, 0.5, 0.0, 1.0), "SlideLeft": (0.5 - d, 0.5, 0.0, 1.0),
        "SlideUp": (0.5, 0.5 - d, 0.0, 1.0), "SlideDown": (0.5, 0.5 + d, 0.0, 1.0),
        "Spin": (0.5, 0.5, 2.0 * np.pi * speed * p, 1.0),
        "ZoomIn": (0.5, 0.5, 0.0, 0.6 + 0.9 * speed * p),
        "ZoomOut": (0.5, 0.5, 0.0, 1.5 - 0.9 * speed * p),
        "Bounce": (0.5, 0.5 + 0.3 * np.sin(2.0 * np.pi * speed * p), 0.0, 1.0),
    }
    return table[motion]


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test in the object's own unit coordinates (radius 1)."""
    if shape == "Disc":
        return u * u + v * v < 1.0
    if shape == "Box":
        return np.maximum(abs(u), abs(v)) < 0.8
    if shape == "Bar":
        return (abs(u) < 1.0) & (abs(v) < 0.35)
    return ((abs(u) < 1.0) & (abs(v) < 0.3)) | ((abs(v) < 1.0) & (abs(u) < 0.3))   # Cross


def render_clip(spec: ClassSpec, rng: np.random.Generator, num_frames: int,
                width: int, height: int) -> np.ndarray:
    """Frames of one clip, uint8 RGB ``[F, H, W, 3]``."""
    speed = rng.uniform(0.8, 1.2)
    radius = rng.uniform(0.24, 0.30) * min(width, height)   # large: colour is a strong cue
    offset = rng.uniform(-0.05, 0.05, size=2)
    # Low-saturation vertical gradient background, different per clip (a nuisance, not a cue).
    top, bottom = rng.uniform(20, 70, size=3), rng.uniform(20, 70, size=3)
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    background = (top + (bottom - top) * ramp) * np.ones((1, width, 1))     # [H, W, 3]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    colour, marker = np.array(spec.rgb, np.float32), np.array([255.0, 255.0, 255.0])
    out = np.empty((num_frames, height, width, 3), np.uint8)
    for i in range(num_frames):
        p = i / max(1, num_frames - 1)
        cx, cy, angle, scale = _trajectory(spec.motion, p, speed)
        dx = (xs - (cx + offset[0]) * width) / (radius * scale)
        dy = (ys - (cy + offset[1]) * height) / (radius * scale)
        cos, sin = np.cos(angle), np.sin(angle)
        u, v = cos * dx + sin * dy, -sin * dx + cos * dy        # rotate into the object frame
        inside = _shape_mask(spec.shape, u, v)
        frame = background.copy()
        frame[inside] = colour
        frame[inside & (u > 0.55)] = marker     # a white tip makes rotation visible
        out[i] = frame.astype(np.uint8)
    return out


def _pyav():
    """PyAV, imported on first use: the CLI reads ``CODECS`` in cached mode, without PyAV."""
    with needs_extra("video"):
        import av
    return av


def encode_video(frames: np.ndarray, path: Path, codec: str, fps: int,
                 first_pts: int = 0) -> None:
    """Write ``frames`` ``[F, H, W, 3]`` uint8 RGB to ``path`` (its suffix picks the container),
    via a temp name; bit-exactly for the codecs of ``CODECS``. ``codec`` is a key of those or
    of ``TEST_ENCODERS``. A negative ``first_pts`` in an MP4 writes an edit list that cuts the
    first ``-first_pts`` frames: they are stored but not shown."""
    _, encoder, pix_fmt, options = {**_ENCODERS, **TEST_ENCODERS}[codec]
    av = _pyav()
    with atomic_path(path) as tmp, \
            av.open(str(tmp), "w", container_options={"fflags": "+bitexact"}) as container:
        # One encoder thread: threaded encoders are not bit-reproducible. It must be the "threads"
        # option; libx264 ignores codec_context.thread_count set from Python.
        stream = container.add_stream(encoder, rate=fps, options={**options, "threads": "1"})
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        stream.time_base = Fraction(1, fps)
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format=pix_fmt)
            frame.pts = first_pts + i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def spinning_clip(width: int = 160, height: int = 120) -> np.ndarray:
    """The decoder tests' frames: 24 frames ``[24, H, W, 3]`` of a spinning shape, each frame
    different from the one before (a shifted or repeated frame shows)."""
    return render_clip(class_specs(6)[4], np.random.default_rng(7), 24, width, height)


def make_codec_clips(out: Path, codecs: list[str], width: int = 160,
                     height: int = 120) -> dict[str, Path]:
    """``spinning_clip`` encoded once per codec (keys of ``CODECS`` or ``TEST_ENCODERS``) as
    ``out/clip_<codec><ext>`` at 25 fps; codec -> path."""
    frames = spinning_clip(width, height)                  # [24, H, W, 3]
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for codec in codecs:
        ext = {**_ENCODERS, **TEST_ENCODERS}[codec][0]
        paths[codec] = out / f"clip_{codec}{ext}"
        encode_video(frames, paths[codec], codec, fps=25)
    return paths


def _split_lists(names: list[str], specs: list[ClassSpec], per_class: int) -> tuple[list, list]:
    """UCF101-style lists: the first ~30% of groups of every class are the test split."""
    n_test = max(1, round(TEST_FRACTION * per_class)) if per_class >= 2 else 0
    train, test = [], []
    for c, spec in enumerate(specs):
        for g in range(per_class):
            rel = f"{spec.name}/{names[c * per_class + g]}"
            (test if g < n_test else train).append(rel if g < n_test else f"{rel} {c + 1}")
    return train, test


def _write_lists(out: Path, specs: list[ClassSpec], names: list[str], per_class: int) -> None:
    lists = out / "ucfTrainTestlist"
    lists.mkdir(parents=True, exist_ok=True)
    train, test = _split_lists(names, specs, per_class)
    contents = {
        "classInd.txt": [f"{c + 1} {s.name}" for c, s in enumerate(specs)],
        "trainlist01.txt": train,
        "testlist01.txt": test,
    }
    for name, lines in contents.items():
        with atomic_path(lists / name) as tmp:
            tmp.write_text("".join(f"{line}\r\n" for line in lines))   # CRLF, as UCF101 ships


def make_sample_data(out: str | Path, *, classes: int = 6, per_class: int = 10,
                     codec: str = "vp9", seed: int = 0, progress: bool = False) -> Path:
    """Generate ``classes * per_class`` clips under ``out`` (UCF101 layout); returns ``out``.

    ``codec`` is one of vp9, h264, mpeg4, mjpeg, or ``mixed`` (clip ``k`` of a class uses codec
    ``k % 4``). One clip per group, so ``gNN`` numbers the clips of a class.
    """
    if codec not in CODECS + ("mixed",):
        raise ValueError(f"unknown codec {codec!r}; expected one of {CODECS + ('mixed',)}")
    if classes < 1 or per_class < 1:
        raise ValueError(f"classes and per_class must be >= 1, got {classes} and {per_class}")
    _pyav()     # a missing PyAV fails here, before the progress bar
    out = Path(out)
    specs, names = class_specs(classes), []
    jobs = [(c, g) for c in range(classes) for g in range(per_class)]
    for c, g in tqdm(jobs, desc="sample-data", unit="clip", disable=not progress):
        spec = specs[c]
        rng = np.random.default_rng([seed, c, g])
        # Every third clip is shorter than a 16-frame clip, so loaders meet repeated frames
        # (every third, not fourth: "mixed" cycles codecs by fours).
        low, high = (MIN_FRAMES, 15) if g % 3 == 1 else (16, MAX_FRAMES)
        num_frames = int(rng.integers(low, high + 1))
        width, height = SIZES[int(rng.integers(len(SIZES)))]
        fps = FPS[int(rng.integers(len(FPS)))]
        clip_codec = CODECS[g % len(CODECS)] if codec == "mixed" else codec
        name = f"v_{spec.name}_g{g + 1:02d}_c01{_ENCODERS[clip_codec][0]}"
        (out / spec.name).mkdir(parents=True, exist_ok=True)
        encode_video(render_clip(spec, rng, num_frames, width, height),
                     out / spec.name / name, clip_codec, fps)
        names.append(name)
    _write_lists(out, specs, names, per_class)
    return out
