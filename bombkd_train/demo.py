"""``bombkd demo``: the whole path on the built-in sample data with tiny backbones.

sample-data -> featurize (train + test) -> train-converters -> train with ``--loader wds`` and
with ``--loader dali`` (same seed, same batches) -> eval -> ``OUT/report.md``: test accuracy,
samples/s and wall time of each mode, the speedup, and the parity of the two runs' step losses.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bombkd_io.atomic import atomic_path
from bombkd_io.errors import ConfigError
from bombkd_io.video.route import parse_device
from bombkd_train.config import DemoConfig

CHANCE_MARGIN = 2.0  # the demo's test accuracy must beat chance by this factor


@dataclass
class ModeRun:
    loader: str
    samples_per_s: float
    wall_s: float
    test_top1: float
    test_top5: float
    step_losses: list[float]


@dataclass
class DemoReport:
    runs: dict[str, ModeRun]
    chance: float
    parity_max_rel: float
    parity_tolerance: float
    markdown: str
    path: Path


def run_demo(cfg: DemoConfig) -> DemoReport:
    """Run every stage into ``cfg.out`` (which must be new or empty) and write the report."""
    cfg.validate()
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"demo folder {out} is not empty; pass a new folder (the demo never "
                          "deletes files)")
    cfg = replace(cfg, device=parse_device(cfg.device))
    t0 = time.perf_counter()
    videos, feats = _prepare(cfg, out)
    conv = _converters(cfg, feats, out)
    runs = {mode: _train_and_eval(cfg, mode, videos, feats, conv, out) for mode in ("wds", "dali")}
    a, b = runs["wds"].step_losses, runs["dali"].step_losses
    if len(a) != len(b):
        raise RuntimeError(f"the two modes took a different number of steps ({len(a)} vs {len(b)})")
    rel = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))
    tol = 1e-2 if cfg.fp16 else 1e-4
    report = DemoReport(runs=runs, chance=100.0 / cfg.classes, parity_max_rel=rel,
                        parity_tolerance=tol, markdown="", path=out / "report.md")
    report.markdown = _markdown(cfg, report, time.perf_counter() - t0)
    with atomic_path(report.path) as tmp:
        tmp.write_text(report.markdown)
    return report


def _prepare(cfg: DemoConfig, out: Path) -> tuple[Path, Path]:
    """Sample videos and the feature cache of both splits (student + teachers)."""
    from bombkd_io.sample_data import make_sample_data
    from bombkd_train.config import FeaturizeConfig
    from bombkd_train.featurize import featurize

    videos = make_sample_data(out / "videos", classes=cfg.classes, per_class=cfg.per_class,
                              codec=cfg.codec, seed=cfg.seed, progress=cfg.progress)
    feats = out / "features"
    for split in ("train", "test"):
        featurize(FeaturizeConfig(
            dataset="ucf101", root=str(videos), split=split, student=cfg.student, out=str(feats),
            teachers=list(cfg.teachers), shard_size=cfg.shard_size, frames=cfg.frames,
            dtype="float16" if cfg.fp16 else "float32", batch_size=cfg.batch_size,
            decode_threads=2, device=cfg.device, progress=cfg.progress))
    return videos, feats


def _converters(cfg: DemoConfig, feats: Path, out: Path) -> Path:
    from bombkd_train.config import ConverterTrainConfig
    from bombkd_train.converters import train_converters

    result = train_converters(ConverterTrainConfig(
        root=str(feats), split="train", teachers=list(cfg.teachers),
        save_dir=str(out / "converters"), epochs=cfg.converter_epochs, batch_size=cfg.batch_size,
        seed=cfg.seed, loader_workers=cfg.loader_workers, device=cfg.device,
        progress=cfg.progress))
    return result.path


def _train_and_eval(cfg: DemoConfig, mode: str, videos: Path, feats: Path, conv: Path,
                    out: Path) -> ModeRun:
    from bombkd_train.config import DataConfig, EvalConfig, TrainConfig
    from bombkd_train.evaluate import evaluate
    from bombkd_train.trainer import train

    run_dir = out / "runs" / mode
    root, cache = (str(feats), None) if mode == "wds" else (str(videos), str(feats))
    data = DataConfig(loader=mode, root=root, dataset="ucf101", student=cfg.student,
                      batch_size=cfg.batch_size, loader_workers=cfg.loader_workers, seed=cfg.seed,
                      cache=cache, device=cfg.device)
    result = train(TrainConfig(
        data=data, split="train", teachers=list(cfg.teachers), converters=str(conv),
        classes=cfg.classes, epochs=cfg.epochs, lr=cfg.lr, save_dir=str(run_dir),
        progress=cfg.progress))
    # both heads are evaluated on the same cached test features
    data = DataConfig(loader="wds", root=str(feats), batch_size=32, device=cfg.device)
    test, _ = evaluate(EvalConfig(data=data, split="test", fusion=str(result.checkpoint),
                                  out=str(run_dir / "eval"), progress=cfg.progress))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["loss"] for r in records if r["kind"] == "step"]
    samples = sum(r["samples"] for r in records if r["kind"] == "epoch")
    return ModeRun(loader=mode, samples_per_s=samples / result.wall_s, wall_s=result.wall_s,
                   test_top1=test.top1, test_top5=test.top5, step_losses=steps)


def _markdown(cfg: DemoConfig, r: DemoReport, total_s: float) -> str:
    wds, dali = r.runs["wds"], r.runs["dali"]
    ok = "ok" if r.parity_max_rel <= r.parity_tolerance else "FAILED"
    rows = "\n".join(f"| {m.loader} | {m.test_top1:.1f}% | {m.test_top5:.1f}% "
                     f"| {m.samples_per_s:.1f} | {m.wall_s:.1f} s |" for m in (wds, dali))
    speedup = wds.samples_per_s / dali.samples_per_s
    return f"""# bombkd demo

{cfg.classes} classes x {cfg.per_class} clips ({cfg.codec}), student `{cfg.student}`, teachers
{", ".join(f"`{t}`" for t in cfg.teachers)}; {cfg.epochs} epochs, batch {cfg.batch_size},
lr {cfg.lr}, seed {cfg.seed}, {"fp16" if cfg.fp16 else "fp32"} cache, device {cfg.device}
({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}).

| loader | test top-1 | test top-5 | train samples/s | train wall time |
|---|---|---|---|---|
{rows}

- chance: {r.chance:.1f}%
- speedup of cached features (wds) over video decoding (dali): {speedup:.1f}x
- parity: max relative difference of the {len(wds.step_losses)} step losses:
  {r.parity_max_rel:.2e} (tolerance {r.parity_tolerance:g}: {ok})
- whole demo: {total_s:.0f} s
"""
