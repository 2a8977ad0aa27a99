"""What a benchmark run leaves behind: one JSON per run, a Markdown summary and a chart.

The suite fills a ``Ledger`` as it goes (timed measurements and checks against limits); at the
end of the session ``write_run`` saves, under ``benchmarks/results/``:

- ``raw/{stamp}-{size}-{device}.json``: everything, with the machine, versions and sizes;
- ``latest.json``, ``latest.md``, ``latest.png``: the same run, for people and CI artefacts;
- ``{size}-{device}.{json,md,png}`` for a ``full`` run: the figures the README quotes, kept apart
  so a later ``small`` run does not overwrite them.
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass
class Measurement:
    """One timed workload: ``count`` items per round, round times in seconds."""

    key: str
    count: int
    unit: str
    seconds: list[float]

    @property
    def median_s(self) -> float:
        return median(self.seconds)

    @property
    def best_s(self) -> float:
        return min(self.seconds)

    @property
    def rates(self) -> list[float]:
        """Items per second in each round, in the order the rounds ran."""
        return [self.count / s for s in self.seconds]

    @property
    def rate(self) -> float:
        """Items per second in the median round."""
        return self.count / self.median_s


@dataclasses.dataclass
class Check:
    """A figure compared to its limit; ``op`` is ``>=`` or ``<=``.

    ``rounds`` holds the figure of each round where the check compares workloads timed in
    alternating rounds; ``figure`` is their median, and only the median decides the verdict
    (the spread is reported, so a reader sees how steady the figure was)."""

    name: str
    figure: float
    op: str
    limit: float
    unit: str
    line: str
    details: dict
    rounds: list[float] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.figure >= self.limit if self.op == ">=" else self.figure <= self.limit

    @property
    def margin(self) -> float:
        """How far inside the limit the figure is: > 1 passes, < 1 fails."""
        if self.op == ">=":
            return self.figure / self.limit if self.limit else float("inf")
        return self.limit / self.figure if self.figure else float("inf")

    @property
    def spread(self) -> dict | None:
        """min / median / max of the per-round figures (None for a single figure)."""
        if len(self.rounds) < 2:
            return None
        return {"min": min(self.rounds), "median": self.figure, "max": max(self.rounds),
                "rounds": len(self.rounds)}


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """CPU, memory, GPU and the versions of everything on the data path."""
    import torch

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu_model": _cpu_model(),
        "cpu_cores": len(os.sched_getaffinity(0)),
        "ram_gib": round(ram / 2**30, 1),
        "gpu": gpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dali": _version("nvidia-dali-cuda120", "nvidia-dali-cuda110", "nvidia-dali-cuda130"),
        "webdataset": _version("webdataset"),
        "av": _version("av"),
        "numpy": _version("numpy"),
        "transformers": _version("transformers"),
        "bombkd": _version("bombkd"),
    }


def run_record(*, size: str, sizes: dict, device: str, measurements: list[Measurement],
               checks: list[Check], started: datetime.datetime) -> dict:
    """The JSON document of one run."""
    return {
        "command": " ".join(["pytest", *sys.argv[1:]]),
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": _now().isoformat(timespec="seconds"),
        "size": size,
        "sizes": sizes,
        "device": device,
        "machine": machine_info(),
        "measurements": [dict(dataclasses.asdict(m), best_s=m.best_s, median_s=m.median_s,
                              rate=m.rate)
                         for m in measurements],
        "checks": [dict(dataclasses.asdict(c), passed=c.passed, margin=c.margin,
                        spread=c.spread) for c in checks],
    }


def markdown(record: dict) -> str:
    """A table of the checks, then the measurements, then the machine."""
    m = record["machine"]
    lines = [
        f"# bombkd benchmarks ({record['size']}, device {record['device']})",
        "",
        f"Command: `{record['command']}`  ",
        f"Run: {record['started_utc']} to {record['finished_utc']} UTC  ",
        f"Machine: {m['cpu_model']}, {m['cpu_cores']} cores, {m['ram_gib']} GiB RAM, "
        f"GPU: {m['gpu'] or 'none'}  ",
        f"Versions: python {m['python']}, torch {m['torch']}, DALI {m['dali']}, "
        f"webdataset {m['webdataset']}, PyAV {m['av']}",
        "",
        "| benchmark | figure (median of rounds) | min .. max of rounds | limit | result |",
        "|---|---:|---:|---:|---|",
    ]
    for c in record["checks"]:
        verdict = "pass" if c["passed"] else "**FAIL**"
        spread = c.get("spread")
        rng = (f"{_fmt(spread['min'])} .. {_fmt(spread['max'])} ({spread['rounds']})"
               if spread else "")
        lines.append(f"| {c['name']} | {_fmt(c['figure'])}{c['unit']} | {rng} | {c['op']} "
                     f"{_fmt(c['limit'])}{c['unit']} | {verdict} |")
    lines += ["", "What each check measured:", ""]
    lines += [f"- {c['line']}" for c in record["checks"]]
    lines += ["", "| measurement | rate (median round) | best round | median round | rounds |",
              "|---|---:|---:|---:|---:|"]
    for r in record["measurements"]:
        lines.append(f"| {r['key']} | {_fmt(r['rate'])} {r['unit']}/s | {r['best_s']:.3f} s "
                     f"| {r['median_s']:.3f} s | {len(r['seconds'])} |")
    lines += ["", "Sizes: " + ", ".join(f"{k}={v}" for k, v in record["sizes"].items()), ""]
    return "\n".join(lines)


def chart(record: dict, path: Path) -> None:
    """Left: measured rates (log scale); right: each check's margin to its limit (> 1 passes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meas, checks = record["measurements"], record["checks"]
    rows = max(len(meas), len(checks), 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 0.38 * rows + 1.6))
    left.barh([f"{r['key']} ({r['unit']}/s)" for r in meas], [r["rate"] for r in meas],
              color="tab:blue")
    left.set_xscale("log")
    left.set_xlabel("rate, median round (log)")
    left.invert_yaxis()
    margins = [min(c["margin"], 1e3) for c in checks]
    colours = ["tab:green" if c["passed"] else "tab:red" for c in checks]
    right.barh([c["name"] for c in checks], margins, color=colours)
    right.axvline(1.0, color="black", linewidth=1)
    right.set_xscale("log")
    right.set_xlabel("margin: figure vs limit (> 1 passes; capped at 1000)")
    right.invert_yaxis()
    fig.suptitle(f"bombkd benchmarks: {record['size']}, {record['device']}, "
                 f"{record['machine']['cpu_model']} x{record['machine']['cpu_cores']}")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_run(record: dict, results_dir: Path = RESULTS_DIR) -> list[Path]:
    """Save the run (see the module docstring); returns the files written."""
    stamp = record["started_utc"][:19].replace(":", "").replace("-", "")
    raw = results_dir / "raw" / f"{stamp}-{record['size']}-{record['device']}.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    _write_text(raw, json.dumps(record, indent=2) + "\n")
    written = [raw]
    names = ["latest"]
    if record["size"] == "full":
        names.append(f"full-{record['device']}")
    for name in names:
        shutil.copyfile(raw, results_dir / f"{name}.json")
        _write_text(results_dir / f"{name}.md", markdown(record))
        chart(record, results_dir / f"{name}.png")
        written += [results_dir / f"{name}{ext}" for ext in (".json", ".md", ".png")]
    return written


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(x: float) -> str:
    if x == 0 or 1e-2 <= abs(x) < 1e5:
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return f"{x:.2e}"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def main() -> None:
    """Re-render ``latest.md`` and ``latest.png`` from a saved run.

    ``python benchmarks/report.py benchmarks/results/raw/RUN.json``
    """
    record = json.loads(Path(sys.argv[1]).read_text())
    _write_text(RESULTS_DIR / "latest.md", markdown(record))
    chart(record, RESULTS_DIR / "latest.png")


if __name__ == "__main__":
    main()
