"""The run's sizes, and the ledger every benchmark writes its timings and checks into.

Speed is only ever asserted as a ratio of two measurements taken in the same run, side by side:
the workloads a check compares are timed in alternating rounds (A, B, A, B, ...) inside one
pytest-benchmark test, and each workload's round times are recorded here under a key. A check
takes the ratio round by round (``Ledger.per_round``) and judges the median of those ratios
against its limit; the printed line and the JSON give min / median / max, so a reader sees the
spread. Load from other processes comes and goes; it hits both sides of one round alike, so
the ratio of a round is steadier than either rate, and the median ignores a round it spoiled.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import pytest

from benchmarks.report import Check, Measurement, median

SIZES = ("small", "full")


@dataclasses.dataclass(frozen=True)
class BenchSize:
    """How much work each benchmark does. ``small`` is CI on 2 cores; ``full`` is the README's."""

    name: str
    classes: int            # sample dataset: classes x per_class videos (vp9)
    per_class: int
    frames: int             # clip length and side, as in training
    size: int
    student: str            # tiny backbone that plays the student
    teachers: tuple[str, ...]
    batch_size: int
    shard_size: int
    rounds: int             # timed rounds per workload (one epoch each for training), >= 5
    cheap_epochs: int       # epochs per round for training without video (too quick for one)
    parity_epochs: int
    codec_per_class: int    # per-codec datasets for the decoder comparison
    loader_samples: int     # the corpus' features repeated to this many, for the loader twin
    scale_samples: int      # samples of the 1x cache in the scale benchmark (4x = 4 times this)
    token_shapes: tuple[tuple[int, int], ...]  # token-level student features [T', D], fp16
    token_samples: int      # samples of each token-level cache
    token_shard_size: int
    step_tokens: int        # the trainer's step is timed on [B, step_tokens, 1024] inputs

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def limit(self, check: str, target: float) -> float | None:
        """The limit ``check`` is held to in this run: its ``target`` (the full suite's, and the
        small suite's on a GPU), or the small suite's CI limit on a CPU-only machine (``None``:
        not checked at this size)."""
        import torch

        if self.name == "small" and not torch.cuda.is_available():
            return SMALL_CPU_LIMITS.get(check, target)
        return target


# The small suite runs in CI on every submission, on a shared 2-core CPU machine, so its limits
# are set from measurements of the suite itself, not from the targets: each is below every
# figure (the median of a run's rounds) seen in 20 consecutive runs on an idle machine and 5 with
# one competing busy process, and above what a deliberate regression of the path it guards
# gives (README, "Performance": the figures and the regressions). A check whose figure is far
# above its target gets a tighter CI limit, so it still catches a real slowdown; a check whose
# small-size figure is noisier than its target allows gets a looser one. Checks not listed use
# their target. The full suite (``--benchmark-size full``) always uses the targets.
# ``None``: not checked at this size (the figure is printed, the check is skipped with the
# reason), where no limit both passes every measured run and fails the regression it guards.
# Measured 2026-12-02 on the 2-core CI machine (README, "Performance": every figure).
SMALL_CPU_LIMITS: dict[str, float | None] = {
    "speedup": 10.0,         # target 5:   runs 19.7 .. 34.9 here, 14.7 in CI; 10 ms more per
                             # cached batch: 8.9 (3 ms more, 13.9, fails cached-loader)
    "cached-loader": 0.75,   # target 0.9: runs 0.83 .. 1.02 (0.9 failed 10 of 20 idle runs)
    "reader-vs-raw": 0.45,   # target 0.3: runs 0.51 .. 0.67; an extra copy + hash per shard: 0.39
    "decode-vp9": 1.5,       # target 0.8: runs 2.00 .. 3.57; 60 ms more per clip batch: 0.90
    "decode-h264": 0.75,     # target 0.7: runs 0.92 .. 1.45
    "featurize": 0.05,       # target 0.1: runs 0.015 .. 0.025; 3 ms more per sample written: 0.19
    "scale-time": 1.2,       # target 1.25: runs 0.86 .. 1.10; epoch plan once per batch: 1.22
    "video-overlap": None,   # target 0.9: runs 0.93 .. 1.49; no overlap at all: 0.95
    "featurize-2-processes": None,  # target 0.9: idle 1.27, 1.29, CI 1.21; beside a busy process
                             # 0.88 .. 0.95; ranks one after the other: 0.99
    # token-level loader (benchmarks/test_tokens.py): 20 idle + 5 busy runs on 2026-12-02
    # (benchmarks/results/ci-limits.md, "Token-level checks"); 96 samples of [392, 1024] make
    # an epoch of ~0.03 s warm: these catch a loader at a third of its speed (warm 0.18), while
    # the one-copy and two-thread paths are held to the targets by the full suite
    "tokens-cold": 0.6,      # target 0.8: runs 0.715 .. 0.845, CI 0.778
    "tokens-warm": 0.3,      # target 0.5: runs 0.488 .. 0.781, CI 0.433; 1 ms more a row: 0.18
    "tokens-vs-npy": 0.5,    # target 1.0: runs 0.899 .. 1.62, CI 0.888; beside heavy jobs 0.57
}

BENCH_SIZES = {
    "small": BenchSize(name="small", classes=4, per_class=8, frames=16, size=112,
                       student="tiny-vjepa2", teachers=("tiny-videomae", "tiny-timesformer"),
                       batch_size=8, shard_size=8, rounds=5, cheap_epochs=20,
                       parity_epochs=2, codec_per_class=4, loader_samples=3000,
                       scale_samples=2000, token_shapes=((392, 1024),), token_samples=96,
                       token_shard_size=24, step_tokens=512),
    "full": BenchSize(name="full", classes=6, per_class=40, frames=16, size=112,
                      student="tiny-vjepa2",
                      teachers=("tiny-videomae", "tiny-timesformer", "tiny-vivit"),
                      batch_size=8, shard_size=16, rounds=5, cheap_epochs=10,
                      parity_epochs=3, codec_per_class=10, loader_samples=20000,
                      scale_samples=5000, token_shapes=((1568, 1024), (2304, 1408)),
                      token_samples=256, token_shard_size=64, step_tokens=2048),
}


@dataclasses.dataclass
class Workload:
    """``fn()`` processes ``count`` ``unit``s; timed under ``key`` ("area/name")."""

    key: str
    fn: Callable[[], object]
    count: int
    unit: str = "samples"


class Ledger:
    """Timed workloads and checks of one run, in the order they happened."""

    def __init__(self) -> None:
        self.measurements: dict[str, Measurement] = {}
        self.checks: list[Check] = []
        self.notes: dict = {}   # figures one test leaves for a later check (not timings)

    def time(self, benchmark, key: str, fn: Callable[[], object], *, count: int,
             unit: str = "samples", rounds: int = 3, warmup: int = 1, group: str | None = None):
        """Time one workload; see ``interleave``. Returns ``fn``'s last result."""
        return self.interleave(benchmark, [Workload(key, fn, count, unit)], rounds=rounds,
                               warmup=warmup, group=group)[key]

    def interleave(self, benchmark, workloads: list[Workload], *, rounds: int = 3,
                   warmup: int = 1, group: str | None = None) -> dict[str, object]:
        """Time workloads side by side: every round runs each once, in a rotating order.

        A check compares them round by round (``per_round``). pytest-benchmark times the whole
        round (``benchmark.pedantic``); each workload's own round times are recorded here under
        its key (also under ``--benchmark-disable``, as one round). Returns each workload's
        last result.
        """
        seconds: dict[str, list[float]] = {w.key: [] for w in workloads}
        results: dict[str, object] = {}
        turn = iter(range(1 << 30))

        def one_round() -> None:
            shift = next(turn) % len(workloads)
            for w in workloads[shift:] + workloads[:shift]:
                start = time.perf_counter()
                results[w.key] = w.fn()
                seconds[w.key].append(time.perf_counter() - start)

        benchmark.group = group or workloads[0].key.split("/")[0]
        benchmark.extra_info.update({w.key: {"count": w.count, "unit": w.unit} for w in workloads})
        benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=warmup, iterations=1)
        for w in workloads:
            kept = seconds[w.key][-rounds:]
            self.measurements[w.key] = Measurement(key=w.key, count=w.count, unit=w.unit,
                                                   seconds=kept)
            benchmark.extra_info[w.key]["per_second"] = self.measurements[w.key].rate
        return results

    def add(self, key: str, *, count: int, seconds: list[float],
            unit: str = "samples") -> Measurement:
        """Record a workload timed elsewhere (e.g. inside a subprocess)."""
        self.measurements[key] = Measurement(key=key, count=count, unit=unit, seconds=list(seconds))
        return self.measurements[key]

    def get(self, key: str) -> Measurement:
        """A recorded workload; skips the calling check when it was not run (deselected)."""
        if key not in self.measurements:
            pytest.skip(f"needs the timed workload {key!r} from the same run; run the whole "
                        "benchmark module (do not deselect it, and do not use --benchmark-only)")
        return self.measurements[key]

    def per_round(self, figure: Callable[..., float], *keys: str) -> list[float]:
        """``figure(rate_a, rate_b, ...)`` for each round of the workloads ``keys``, timed in the
        same ``interleave`` (so round i of each ran side by side)."""
        rates = [self.get(key).rates for key in keys]
        if len({len(r) for r in rates}) != 1:
            raise ValueError(f"{keys}: not timed in the same rounds ({[len(r) for r in rates]})")
        return [figure(*values) for values in zip(*rates)]

    def ratios(self, key: str, other: str) -> list[float]:
        """Rate of ``key`` over rate of ``other``, round by round."""
        return self.per_round(lambda a, b: a / b, key, other)

    def check(self, name: str, what: str, figure: float | list[float], op: str, limit: float,
              *, unit: str = "", details: dict | None = None) -> Check:
        """Record and print one line: what was measured, the figure and its limit.

        ``figure``: one value, or the figure of each round, whose median is judged."""
        rounds = [float(f) for f in figure] if isinstance(figure, (list, tuple)) else []
        value = median(rounds) if rounds else float(figure)
        verdict = "pass" if (value >= limit if op == ">=" else value <= limit) else "FAIL"
        spread = (f" (median of {len(rounds)} rounds, min {_num(min(rounds))}, "
                  f"max {_num(max(rounds))})" if len(rounds) > 1 else "")
        line = (f"{name}: {what}: {_num(value)}{unit}{spread} (limit {op} {_num(limit)}{unit}) "
                f"-> {verdict}")
        check = Check(name=name, figure=value, op=op, limit=float(limit), unit=unit, line=line,
                      details=dict(details or {}), rounds=rounds)
        self.checks.append(check)
        print(line)
        return check

    def require(self, name: str, what: str, figure: float | list[float], op: str, limit: float,
                **kwargs) -> Check:
        """``check``, and fail the calling test when the figure is past its limit."""
        check = self.check(name, what, figure, op, limit, **kwargs)
        assert check.passed, check.line
        return check

    def compare(self, name: str, what: str, key: str, other: str, limit: float, *,
                per: float = 1.0, rate: str = "samples/s", details: dict | None = None) -> Check:
        """``require`` that workload ``key`` runs at least ``limit`` times as fast as ``other``,
        round by round; the line gives both rates (divided by ``per``, in ``rate``)."""
        a, b = self.get(key), self.get(other)
        return self.require(name, f"{what} {_num(a.rate / per)} vs {_num(b.rate / per)} {rate}",
                            self.ratios(key, other), ">=", limit, unit="x",
                            details={f"{key}_per_s": a.rate, f"{other}_per_s": b.rate,
                                     **(details or {})})


def _num(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
