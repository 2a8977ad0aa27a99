"""Two runs' save dirs hold the same training: bit-identical weights and optimizer state in a
checkpoint of each, and the same metrics records but for their timing."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def records(run: Path, kind: str = "step") -> list[dict]:
    """``run``'s metrics records of ``kind``, without ``samples_per_s`` (the run's speed)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in r.items() if k != "samples_per_s"}
            for r in map(json.loads, lines) if r["kind"] == kind]


def assert_same_run(a: Path, b: Path, name: str = "fusion_ep2.pt") -> None:
    """``torch.equal`` on every tensor of the model and the optimizer state of ``name`` in both
    save dirs, and equal step and epoch records."""
    ca, cb = (torch.load(d / name, weights_only=True) for d in (a, b))
    assert ca["step"] == cb["step"]
    assert ca["model"].keys() == cb["model"].keys()
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        assert all(torch.equal(sa[i][k], sb[i][k]) for k in sa[i]), i
    assert records(a) == records(b)
    assert records(a, "epoch") == records(b, "epoch")
