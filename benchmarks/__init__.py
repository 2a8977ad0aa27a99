"""bombkd benchmark suite: `pytest benchmarks --benchmark` (README.md, Performance, says what
each check measures).

ledger.py, report.py   timing in alternating rounds, checks on per-round ratios, the reports
workloads.py, scale.py the data and workloads timed (library calls only), large caches
test_*.py              the suite: video decode, featurize, reader and scale, token-level
                       payloads, training, parity
measure_*.py           one-off figures quoted in the docs (`python -m benchmarks.measure_loader`)
"""
