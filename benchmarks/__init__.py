"""bombkd benchmark suite: `pytest benchmarks --benchmark` (see README.md here)."""
