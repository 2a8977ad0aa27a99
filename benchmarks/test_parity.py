"""Parity: video mode and cached mode give the same features, losses and accuracy.

One video-mode run (features computed live, float32) is compared with the float32 and the float16
cache of the same videos, and with cached-mode training on each, same seed and settings.
DESIGN.md's tolerances: features max abs <= 1e-5 (fp32; fp16: within fp16 rounding); per-step
loss relative difference <= 1e-4 (fp32) / 1e-2 (fp16); final top-1 within 1 point.
"""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks.workloads import (DTYPES, cached_features, features_by_key, materialise,
                                  train_config, train_records)
from bombkd_train.data import open_source

FEATURE_ABS_MAX = 1e-5
LOSS_REL_MAX = {"float32": 1e-4, "float16": 1e-2}
TOP1_POINTS_MAX = 1.0
FP16_HALF_ULP = 2.0 ** -11      # relative rounding error of float16
FP16_MIN_NORMAL = 2.0 ** -14


@pytest.fixture(scope="module")
def video_features(corpus, bench_size, bench_dir):
    """key -> student features [T', D] computed in video mode (the video loader alone)."""
    cfg = train_config(corpus, bench_size, "video", bench_dir / "parity-features")
    source = open_source(cfg.data, cfg.split)
    try:
        return features_by_key(materialise(source.loader))
    finally:
        source.close()


@pytest.fixture(scope="module")
def runs(corpus, bench_size, bench_dir):
    """mode -> (step records, epoch records) of a full training run, made once."""
    made = {}

    def get(mode: str, dtype: str = "float32"):
        name = f"{mode}-{dtype}" if mode == "cached" else mode
        if name not in made:
            cfg = train_config(corpus, bench_size, mode, bench_dir / f"parity-{name}",
                               dtype=dtype, epochs=bench_size.parity_epochs)
            made[name] = train_records(cfg)
        return made[name]

    return get


@pytest.mark.parametrize("dtype", DTYPES)
def test_feature_parity(ledger, corpus, video_features, dtype):
    cached = cached_features(corpus.caches[dtype])
    assert sorted(cached) == sorted(video_features), "both modes must yield the same keys"
    video = np.stack([video_features[k] for k in sorted(cached)])  # [N, T', D]
    stored = np.stack([cached[k] for k in sorted(cached)])         # [N, T', D]
    err = np.abs(video - stored)
    if dtype == "float32":
        what, figure, limit = ("max |video - cached fp32| over all features", err.max(),
                               FEATURE_ABS_MAX)
    else:
        # within fp16 rounding: at most half an fp16 ulp of the value, plus the fp32 tolerance
        bound = FP16_HALF_ULP * np.maximum(np.abs(video), FP16_MIN_NORMAL) + FEATURE_ABS_MAX
        what, figure, limit = ("max |video - cached fp16| in units of fp16 rounding "
                               "(half an ulp + 1e-5)"), (err / bound).max(), 1.0
    ledger.require(f"feature-parity-{dtype}", f"{what} ({len(cached)} samples)",
                   float(figure), "<=", limit,
                   details={"samples": len(cached), "max_abs": float(err.max())})


@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_parity(ledger, runs, dtype):
    video_steps, _ = runs("video")
    cached_steps, _ = runs("cached", dtype)
    assert len(video_steps) == len(cached_steps) > 0, "both modes must take the same steps"
    v = np.array([r["loss"] for r in video_steps])
    c = np.array([r["loss"] for r in cached_steps])
    rel = np.abs(v - c) / np.maximum(np.abs(v), 1e-12)
    ledger.require(f"loss-parity-{dtype}", f"max relative per-step loss difference, "
                   f"video vs cached {dtype} ({len(v)} steps)", float(rel.max()), "<=",
                   LOSS_REL_MAX[dtype], details={"steps": len(v)})


@pytest.mark.parametrize("dtype", DTYPES)
def test_top1_parity(ledger, runs, dtype):
    _, video_epochs = runs("video")
    _, cached_epochs = runs("cached", dtype)
    v, c = video_epochs[-1]["top1"], cached_epochs[-1]["top1"]
    ledger.require(f"top1-parity-{dtype}", f"final-epoch top-1, video {v:.2f} vs cached "
                   f"{dtype} {c:.2f} (points apart)", abs(v - c), "<=", TOP1_POINTS_MAX,
                   unit=" pt", details={"video_top1": v, "cached_top1": c})
