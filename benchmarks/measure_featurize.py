"""Measure featurize: clips/s end to end, where the time goes, and the share spent writing shards.

    .venv/bin/python -m benchmarks.measure_featurize [--classes 6 --per-class 10 --codec vp9
        --student tiny-vjepa2 --teachers tiny-videomae,tiny-timesformer,tiny-vivit
        --batch 8 --workers 2 --shard-size 1000 --device cpu --repeat 2]

Generates the sample data (UCF101 layout) in a temp dir, featurizes both splits into a fresh
cache per repeat, and prints one JSON line per run plus a summary. The twin measurement runs the
same models on clips already in memory, so decode cost and model cost can be told apart.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from bombkd_io.sample_data import make_sample_data
from bombkd_train.backbones import create_backbone
from bombkd_train.config import FeaturizeConfig
from bombkd_train.featurize import FeaturizeStats, featurize


def run_once(args, data: Path, out: Path) -> dict:
    """Featurize train + test into ``out``; the stats of both runs summed."""
    total = FeaturizeStats()
    for split in ("train", "test"):
        stats = FeaturizeStats()
        featurize(FeaturizeConfig(dataset="ucf101", root=str(data), split=split,
                                  student=args.student, teachers=args.teachers, out=str(out),
                                  shard_size=args.shard_size, batch_size=args.batch,
                                  decode_threads=args.workers, device=args.device), stats=stats)
        for name in ("clips", "failed", "shards", "bytes", "probe_s", "decode_wait_s",
                     "write_s", "total_s"):
            setattr(total, name, getattr(total, name) + getattr(stats, name))
        total.threads = stats.threads
        for role, seconds in stats.infer_s.items():
            total.infer_s[role] = total.infer_s.get(role, 0.0) + seconds
    models_s = sum(total.infer_s.values())
    return {"clips": total.clips, "failed": total.failed, "shards": total.shards,
            "mbytes": round(total.bytes / 1e6, 3), "total_s": round(total.total_s, 3),
            "clips_per_s": round(total.clips_per_s, 2),
            "write_s": round(total.write_s, 3),
            "write_share": round(total.write_s / total.total_s, 4),
            "probe_s": round(total.probe_s, 3), "decode_wait_s": round(total.decode_wait_s, 3),
            "models_s": round(models_s, 3), "model_threads": total.threads,
            "models_s_each": {k: round(v, 3) for k, v in total.infer_s.items()}}


def models_in_memory(args, threads: int) -> dict:
    """The twin: the same backbones on random clips already in memory (no decode, no write),
    with the torch thread count featurize used."""
    torch.set_num_threads(threads)
    names = [args.student, *args.teachers]
    backbones = [create_backbone(n, frames=args.frames if i == 0 else None, device=args.device)
                 for i, n in enumerate(names)]
    clips = {(bb.frames, bb.size): torch.randint(0, 256, (args.batch, bb.frames, bb.size, bb.size, 3),
                                                 dtype=torch.uint8) for bb in backbones}
    for bb in backbones:  # warm-up
        bb(clips[(bb.frames, bb.size)])
    steps, start = 10, time.perf_counter()
    for _ in range(steps):
        for bb in backbones:
            bb(clips[(bb.frames, bb.size)])
    seconds = time.perf_counter() - start
    return {"clips_per_s": round(steps * args.batch / seconds, 2), "batch": args.batch,
            "threads": threads}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--codec", default="vp9")
    p.add_argument("--student", default="tiny-vjepa2")
    p.add_argument("--teachers", default="tiny-videomae,tiny-timesformer,tiny-vivit")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    args.teachers = [t for t in args.teachers.split(",") if t]
    env = {"machine": platform.machine(), "cpus": torch.get_num_threads(),
           "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_sample_data(Path(tmp) / "data", classes=args.classes,
                                per_class=args.per_class, codec=args.codec)
        runs = []
        for r in range(args.repeat):
            runs.append(run_once(args, data, Path(tmp) / f"cache{r}"))
            print(json.dumps({"run": r, **runs[-1]}))
    twin = models_in_memory(args, runs[-1]["model_threads"])
    best = max(runs, key=lambda run: run["clips_per_s"])
    print(json.dumps({"env": env, "args": vars(args), "best": best, "models_in_memory": twin}))
    print(f"featurize: {best['clips_per_s']} clips/s end to end ({best['clips']} clips, student "
          f"+ {len(args.teachers)} teachers); writing shards {100 * best['write_share']:.1f}% "
          f"of the time; models alone on in-memory clips: {twin['clips_per_s']} clips/s")


if __name__ == "__main__":
    main()
