"""``bombkd inspect`` and ``bombkd import-cache``: exit codes and messages."""
from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
from typer.testing import CliRunner

from bombkd_train.cli.main import app
from places import GOLDEN

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_inspect_summary():
    result = run("inspect", GOLDEN)
    assert result.exit_code == 0, result.output
    assert "golden-train" in result.output and "3 samples" in result.output
    assert "student" in result.output and "[2, 4] float16" in result.output
    assert "videomae" in result.output and "tiny-videomae" in result.output
    assert "v_run_g02_c01.avi: no decodable frame" in result.output


def test_inspect_verify_ok_and_bad(tmp_path):
    assert "verify: ok" in run("inspect", GOLDEN, "--split", "train", "--verify").output
    root = tmp_path / "golden"
    shutil.copytree(GOLDEN, root)
    bad = root / "golden-train-student-000001.tar"
    raw = bytearray(bad.read_bytes())
    raw[1600] ^= 0xFF
    bad.write_bytes(bytes(raw))
    result = run("inspect", root, "--verify")
    assert result.exit_code == 2
    assert "error: bad shards" in result.output and str(bad) in result.output


def test_inspect_errors(tmp_path):
    result = run("inspect", tmp_path / "missing")
    assert result.exit_code == 2 and "error:" in result.output and "missing" in result.output
    result = run("inspect", GOLDEN, "--split", "test")
    assert result.exit_code == 2 and "no split 'test' in this cache" in result.output
    assert "it has train (golden)" in result.output


def test_import_cache(tmp_path):
    src = tmp_path / "features_ucf101_train.pkl"
    src.write_bytes(pickle.dumps([{"student": np.ones((2, 3), np.float16) * i, "label": i % 2,
                                   "path": f"/v/c{i % 2}/x{i}.avi",
                                   "videomae": np.ones((1, 4), np.float16)} for i in range(4)]))
    result = run("import-cache", src, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "--trust-pickle" in result.output
    result = run("import-cache", src, "--out", tmp_path / "out", "--trust_pickle",
                 "--shard-size", "2")
    assert result.exit_code == 0, result.output
    assert "ucf101-train" in result.output and "4 samples" in result.output
    assert (tmp_path / "out" / "ucf101-train.index.json").is_file()
    assert run("inspect", tmp_path / "out", "--verify").exit_code == 0
    result = run("import-cache", src, "--out", tmp_path / "out", "--trust-pickle")
    assert result.exit_code == 2 and "already holds" in result.output


def test_help_explains_pickle():
    result = run("import-cache", "--help")
    assert result.exit_code == 0 and "arbitrary code" in result.output


def test_inspect_shows_where_each_model_came_from(tmp_path):
    root = tmp_path / "cache"
    shutil.copytree(GOLDEN, root)
    assert "weights: not recorded" in run("inspect", root).output  # a manifest from before
    path = root / "golden-train.index.json"
    data = json.loads(path.read_text())
    data["models"]["student"] |= {"source": "/models/vjepa2", "revision": "v1",
                                  "weights": "files-sha256:00ff", "model_dtype": "float32",
                                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                  "bombkd": "0.1.0"}
    path.write_text(json.dumps(data))
    result = run("inspect", root)
    assert result.exit_code == 0, result.output
    assert ("weights: /models/vjepa2 @ v1, files-sha256:00ff; float32, mean [0.485, 0.456, "
            "0.406], std [0.229, 0.224, 0.225]; bombkd 0.1.0") in result.output
