"""Clips/s of three decoders, per codec, on the sample data (16 frames, 112 px), side by side.

- ``dali``:         ClipLoader (DALI CPU pipeline; PyAV-routed codecs enter it raw)
- ``pyav-sampled``: decode_frames (RGB for the sampled frames only) + the torch resize
- ``pyav-every``:   the simple way: every frame converted to RGB, then pick + the same resize
and the difference between ``decode_clip(backend="dali")`` and ``backend="pyav"`` per codec.

    .venv/bin/python -m benchmarks.measure_decode [--per-class 10 --repeats 3 --threads 2 --batch 8]
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import nvidia.dali as dali
import torch

from bombkd_io.sample_data import CODECS, make_sample_data
from bombkd_io.sampling import sample_indices
from bombkd_io.video import ClipLoader, decode_clip, probe_videos
from bombkd_io.video.pyav import decode_frames
from bombkd_io.video.resize import resize_crop


NAMES = ("dali", "pyav-sampled", "pyav-every")


def pyav_every_frame(path: str, indices: np.ndarray, size: int) -> np.ndarray:
    """The baseline: decode (PyAV's default threading) and convert every frame, then pick."""
    with av.open(path) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return resize_crop(np.stack(frames)[indices], size)


def clip_difference(infos, args) -> tuple[float, float, int]:
    """|DALI clip - PyAV clip| over all clips: mean, 99th percentile, max (uint8 levels)."""
    diffs = [np.abs(decode_clip(i.path, args.frames, args.size, backend="dali").astype(np.int16)
                    - decode_clip(i.path, args.frames, args.size, backend="pyav"))
             for i in infos]
    flat = np.concatenate([d.ravel() for d in diffs])
    return float(flat.mean()), float(np.percentile(flat, 99)), int(flat.max())


def best_rates(runs: dict, count: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Per run: (clips per wall second, clips per CPU second of this process), best passes.

    Passes are interleaved (a, b, c, a, b, c, ...) so a change in the machine's other load hits
    every decoder alike; CPU seconds (all threads) are the cost that other load cannot inflate.
    """
    wall = {name: float("inf") for name in runs}
    cpu = dict(wall)
    for _ in range(repeats):
        for name, run in runs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            wall[name] = min(wall[name], time.perf_counter() - start)
            cpu[name] = min(cpu[name], time.process_time() - start_cpu)
    return {name: (count / wall[name], count / cpu[name]) for name in runs}


def measure_codec(root: Path, args) -> dict[str, float]:
    infos, failed = probe_videos(sorted(root.glob("*/v_*")))
    assert not failed, failed
    picks = [sample_indices(i.num_frames, args.frames) for i in infos]
    loader = ClipLoader(infos, frames=args.frames, size=args.size, batch_size=args.batch,
                        device="cpu", num_threads=args.threads, prefetch=2)
    plan = [list(range(s, min(s + args.batch, len(infos))))
            for s in range(0, len(infos), args.batch)]

    def dali_run():
        for batch in loader.batches(plan):
            assert not batch.failed

    runs = {
        "dali": dali_run,
        "pyav-sampled": lambda: [resize_crop(decode_frames(i.path, p), args.size)
                                 for i, p in zip(infos, picks)],
        "pyav-every": lambda: [pyav_every_frame(i.path, p, args.size)
                               for i, p in zip(infos, picks)],
    }
    dali_run()                                       # warm-up: builds the pipeline
    rates = best_rates(runs, len(infos), args.repeats)
    rates["route"] = infos[0].route
    rates["diff"] = clip_difference(infos, args)
    rates["frames/clip"] = float(np.mean([i.num_frames for i in infos]))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="DALI num_threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--codecs", default=",".join(CODECS))
    args = parser.parse_args()
    torch.set_num_threads(1)      # the resize is tiny; keep the comparison about decoding
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch thread(s); av {av.__version__}, "
          f"DALI {dali.__version__}, torch {torch.__version__}")
    print(f"# {args.classes * args.per_class} clips per codec, {args.frames} frames, "
          f"{args.size} px, DALI batch {args.batch}, {args.threads} DALI thread(s); clips/s, "
          f"best of {args.repeats}")
    print(f"{'codec':6} {'route':5} {'frames':>6} | clips/s wall: {'dali':>6} {'sampled':>7} "
          f"{'every':>6} | clips/CPU-s: {'dali':>6} {'sampled':>7} {'every':>6} | "
          f"dali/every sampled/every (CPU) | |dali-pyav| mean/p99/max")
    with tempfile.TemporaryDirectory() as tmp:
        for codec in args.codecs.split(","):
            root = make_sample_data(Path(tmp) / codec, classes=args.classes,
                                    per_class=args.per_class, codec=codec)
            r = measure_codec(root, args)
            wall = " ".join(f"{r[k][0]:{w}.1f}" for k, w in zip(NAMES, (6, 7, 6)))
            cpu = " ".join(f"{r[k][1]:{w}.1f}" for k, w in zip(NAMES, (6, 7, 6)))
            ratios = (f"{r['dali'][1] / r['pyav-every'][1]:10.2f} "
                      f"{r['pyav-sampled'][1] / r['pyav-every'][1]:13.2f}")
            print(f"{codec:6} {r['route']:5} {r['frames/clip']:6.1f} |               {wall} |"
                  f"              {cpu} | {ratios}       | "
                  "{:.3f}/{:.0f}/{}".format(*r["diff"]))


if __name__ == "__main__":
    main()
