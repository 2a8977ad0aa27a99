"""`bombkd demo`: the whole path, both loaders, on a small sample set."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from bombkd_train.cli.main import app
from bombkd_train.config import DemoConfig
from bombkd_train.demo import CHANCE_MARGIN, run_demo


@pytest.mark.slow
def test_demo_runs_both_modes_and_reports(tmp_path):
    cfg = DemoConfig(out=str(tmp_path / "demo"), classes=4, per_class=8, epochs=4, converter_epochs=1,
                     shard_size=8, progress=False)
    report = run_demo(cfg)
    wds, dali = report.runs["wds"], report.runs["dali"]
    assert len(wds.step_losses) == len(dali.step_losses) > 0
    assert report.parity_max_rel <= report.parity_tolerance == 1e-2
    assert wds.samples_per_s > 0 and dali.samples_per_s > 0
    assert wds.test_top1 >= CHANCE_MARGIN * report.chance  # the sample classes are learnable
    count = json.loads((tmp_path / "demo" / "runs" / "wds" / "eval" / "eval.json").read_text())["count"]
    assert abs(wds.test_top1 - dali.test_top1) <= 100.0 / count + 1e-9  # one test clip at most
    text = (tmp_path / "demo" / "report.md").read_text()
    assert text == report.markdown
    for fragment in ("| wds |", "| dali |", "speedup", "parity", "chance: 25.0%"):
        assert fragment in text
    for mode in ("wds", "dali"):
        assert (tmp_path / "demo" / "runs" / mode / "eval" / "confusion.png").is_file()


def test_demo_refuses_a_folder_with_files(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = CliRunner().invoke(app, ["demo", str(tmp_path), "--quiet"])
    assert result.exit_code == 2
    assert "is not empty" in result.stderr and (tmp_path / "keep.txt").read_text() == "mine"
