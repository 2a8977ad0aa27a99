"""The benchmark suite's switches, shared data and results.

    pytest benchmarks --benchmark [--benchmark-size small|full]

Without ``--benchmark`` every benchmark is collected and skipped, with a reason saying how to run
it. ``--benchmark`` is this suite's own flag: pytest-benchmark defines none of that exact name
(only ``--benchmark-only``, ``--benchmark-skip``, ... which keep their meaning; pytest does not
accept abbreviated options, so there is no prefix clash). Do not combine with ``--benchmark-only``:
the checks run in tests of their own, without the ``benchmark`` fixture, and would be skipped.
Each item gets the ``benchmark`` marker (declared in pyproject.toml); it carries no arguments, so
pytest-benchmark, which reads that marker's keyword arguments, keeps its defaults.

Shared data (sample videos, caches, converters) is built once per session under a temporary
directory; the results are written at the end of the session (see ``benchmarks/report.py``).
"""
from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from benchmarks.ledger import BENCH_SIZES, SIZES, BenchSize, Ledger
from benchmarks.report import run_record, write_run

HERE = Path(__file__).resolve().parent
HOW_TO_RUN = ("benchmarks run only on request: `pytest benchmarks --benchmark "
              "[--benchmark-size small|full]`")
LEDGER = pytest.StashKey[Ledger]()
STARTED = pytest.StashKey[datetime.datetime]()
RESULT_FILES = pytest.StashKey[list]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bombkd", "bombkd benchmark suite")
    group.addoption("--benchmark", action="store_true", dest="bombkd_benchmark", default=False,
                    help="run the bombkd benchmark suite in benchmarks/ (skipped otherwise)")
    group.addoption("--benchmark-size", dest="bombkd_benchmark_size", choices=SIZES,
                    default="small",
                    help="small: a few minutes on 2 CPU cores (CI); full: the README's figures")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[LEDGER] = Ledger()
    config.stash[STARTED] = datetime.datetime.now(datetime.timezone.utc)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason=HOW_TO_RUN)
    for item in items:
        if HERE in Path(item.fspath).resolve().parents:
            item.add_marker(pytest.mark.benchmark)
            if not config.getoption("bombkd_benchmark"):
                item.add_marker(skip)


def _size(config: pytest.Config) -> BenchSize:
    return BENCH_SIZES[config.getoption("bombkd_benchmark_size")]


def _device() -> str:
    """Video mode runs where the training would: the GPU when there is one."""
    from bombkd_io.video.route import parse_device

    return parse_device("auto")


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    ledger = config.stash.get(LEDGER, None)
    if not config.getoption("bombkd_benchmark") or ledger is None:
        return
    if not (ledger.measurements or ledger.checks):
        return
    record = run_record(size=_size(config).name, sizes=_size(config).as_dict(), device=_device(),
                        measurements=list(ledger.measurements.values()), checks=ledger.checks,
                        started=config.stash[STARTED])
    config.stash[RESULT_FILES] = write_run(record)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    ledger = config.stash.get(LEDGER, None)
    if ledger is None or not ledger.checks:
        return
    terminalreporter.section("bombkd benchmarks")
    for check in ledger.checks:
        terminalreporter.write_line(check.line)
    for path in config.stash.get(RESULT_FILES, []):
        terminalreporter.write_line(f"saved {path}")


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ledger(request) -> Ledger:
    return request.config.stash[LEDGER]


@pytest.fixture(scope="session")
def bench_size(request) -> BenchSize:
    return _size(request.config)


@pytest.fixture(scope="session")
def bench_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bombkd-bench")


@pytest.fixture(scope="session")
def corpus(bench_dir, bench_size):
    """Sample videos, a float32 and a float16 cache of them, and converters: built once."""
    from benchmarks.workloads import make_corpus

    return make_corpus(bench_dir / "corpus", bench_size)
