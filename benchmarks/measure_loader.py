"""Measure the cached loader against a raw read of the same shard bytes, and its peak RSS.

    .venv/bin/python -m benchmarks.measure_loader [--samples 4000 --big 16000 --batch 8]
    .venv/bin/python -m benchmarks.measure_loader --tokens 2304 --dim 1408 --shard-size 64 \\
        --samples 256 --big 0 --teachers 0          # token-level features, 6.5 MB a sample

Writes a synthetic cache (student + --teachers teachers, [--tokens, --dim] fp16 random
features, default [16, 768] in shards of 1000) with ShardSetWriter, then times epochs of the
fusion loader (student set only) in-process and with 1 and 2 workers, beside a raw sequential
read of the same student shards: "warm" from the page cache (multi-epoch training on a machine
with RAM to spare) and "cold" with the shards dropped from the page cache before each
epoch/read. Then the peak RSS of a loader (in-process, and 2 workers) run in a fresh process at
--samples and --big samples (0: skip). Records the load average: the machine may be shared.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.scale import drop_from_page_cache, write_cache
from bombkd_io.loaders.cached import make_cached_loader
from bombkd_io.shards.manifest import ModelEntry, load_manifest

TEACHERS = ("videomae", "timesformer", "vivit")
TOKENS, DIM, DISTINCT = 16, 768, 1000


def make_cache(root: Path, samples: int, shard_size: int = 1000, tokens: int = TOKENS,
               dim: int = DIM, teachers: int = len(TEACHERS)) -> None:
    """Student + ``teachers`` teachers, [tokens, dim] fp16 random features (tiled: 1000
    distinct ones, fewer when they are large), 101 classes."""
    rng = np.random.default_rng(0)
    distinct = max(1, min(DISTINCT, (256 << 20) // (tokens * dim * 4)))
    features = rng.standard_normal((distinct, tokens, dim), dtype=np.float32)  # [N, T', D]
    like = ModelEntry("student", "synthetic-student", dim, tokens, 16, 112, "time", "float16")
    write_cache(root, samples, features=features, labels=np.arange(distinct) % 101, like=like,
                shard_size=shard_size, dataset="synth", teachers=TEACHERS[:teachers])


def time_loader(root: Path, workers: int, batch: int, paths: list[Path], cold: bool,
                epochs: int = 3) -> dict:
    """Samples per second of whole epochs (worker start-up included) after a warm-up epoch;
    ``cold``: the shards are dropped from the page cache before each epoch."""
    loader = make_cached_loader(root, "train", batch_size=batch, num_workers=workers)
    for _ in loader:
        pass
    rates, cpu = [], []
    for epoch in range(1, epochs + 1):
        loader.set_epoch(epoch)
        if cold:
            drop_from_page_cache(paths)
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        n = sum(len(b["key"]) for b in loader)
        rates.append(n / (time.perf_counter() - start))
        cpu.append((_cpu_seconds() - cpu_start) / n * 1e6)
    # CPU time of this process and its (joined) workers per sample: what the loader costs,
    # whatever else the machine is running.
    return {"samples_s_median": float(np.median(rates)), "samples_s_best": max(rates),
            "cpu_us_per_sample": float(np.median(cpu))}


def _cpu_seconds() -> float:
    me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def raw_read(paths: list[Path], cold: bool) -> float:
    """MB/s of a sequential read of the files, 8 MiB reads (median of 3)."""
    rates = []
    for _ in range(3):
        if cold:
            drop_from_page_cache(paths)
        else:
            for p in paths:
                p.read_bytes()
        start, size = time.perf_counter(), 0
        for p in paths:
            with open(p, "rb", buffering=0) as f:
                while chunk := f.read(8 << 20):
                    size += len(chunk)
        rates.append(size / (time.perf_counter() - start) / 1e6)
    return float(np.median(rates))


RSS_PROBE = """
import glob, sys
from bombkd_io.loaders.cached import make_cached_loader

def hwm(pid="self"):  # peak RSS (MiB) of a process image; ru_maxrss would count its parent's
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:  # a child that has just exited
        pass
    return 0.0

loader = make_cached_loader(sys.argv[1], "train", batch_size=int(sys.argv[2]),
                            num_workers=int(sys.argv[3]))
before, batches, n = hwm(), iter(loader), 0
for _ in range(len(loader) - 1):
    n += len(next(batches)["key"])
children = [c for f in glob.glob("/proc/self/task/*/children") for c in open(f).read().split()]
workers = [hwm(c) for c in children]  # read while the workers are alive, near the epoch's end
n += sum(len(b["key"]) for b in batches)
print(n, before, hwm(), max(workers, default=0))
"""


def peak_rss(root: Path, workers: int, batch: int) -> dict:
    """Peak RSS (MiB, VmHWM) of a fresh process running one loader epoch: before reading
    (imports done, loader made), at the end, and its largest worker."""
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(root), str(batch), str(workers)],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"RSS probe failed:\n{out.stderr}")
    n, before, main, worker = out.stdout.split()
    return {"samples": int(n), "main_before_mb": float(before), "main_peak_mb": float(main),
            "largest_worker_peak_mb": float(worker)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--big", type=int, default=16000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=TOKENS)
    ap.add_argument("--dim", type=int, default=DIM)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--teachers", type=int, default=len(TEACHERS), choices=range(4))
    ap.add_argument("--dir", type=Path, default=None, help="where to write the caches (temp)")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(dir=args.dir))
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
              "python": platform.python_version(), "torch": torch.__version__,
              "numpy": np.__version__, "samples": args.samples, "batch": args.batch,
              "sample_shape": [args.tokens, args.dim], "shard_size": args.shard_size,
              "dtype": "float16"}
    result["load_average_start"] = os.getloadavg()  # the machine may be shared: say how busy
    small = base / "small"
    make_cache(small, args.samples, args.shard_size, args.tokens, args.dim, args.teachers)
    manifest = load_manifest(small, "train")
    os.sync()  # written pages must be clean before they can be dropped from the page cache
    paths = [small / s.name for s in manifest.models["student"].shards]
    student_bytes = sum(p.stat().st_size for p in paths)
    result["student_set_mb"] = student_bytes / 1e6
    per_sample_mb = student_bytes / args.samples / 1e6
    for cache in ("warm", "cold"):
        raw = raw_read(paths, cold=cache == "cold")
        result[f"{cache}_raw_read_mb_s"] = raw
        for workers in (0, 1, 2):
            rates = time_loader(small, workers, args.batch, paths, cold=cache == "cold")
            mb_s = rates["samples_s_median"] * per_sample_mb
            result[f"{cache}_workers_{workers}"] = {**rates, "mb_s_median": mb_s,
                                                    "fraction_of_raw": mb_s / raw}
    caches = [(small, args.samples)]
    if args.big:
        caches.append((base / "big", args.big))
        make_cache(base / "big", args.big, args.shard_size, args.tokens, args.dim, args.teachers)
    for root, count in caches:
        for workers in (0, 2):
            result[f"rss_{count}_workers_{workers}"] = peak_rss(root, workers, args.batch)
    result["load_average_end"] = os.getloadavg()
    shutil.rmtree(base)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
