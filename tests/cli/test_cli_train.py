"""`bombkd train-converters`, `train` and `eval` through the CLI: outputs, exit codes, messages."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from bombkd_train.cli.main import app
from synthetic_cache import make_feature_cache

runner = CliRunner()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = make_feature_cache(tmp_path_factory.mktemp("cache"))
    make_feature_cache(root, split="test", count=20, seed=1)
    result = runner.invoke(app, ["train-converters", "--root", str(root), "--split", "train",
                                 "--teachers", "ta,tb", "--epochs", "1", "--save_dir", str(root / "conv"),
                                 "--kind", "mlp", "--batch", "16"])
    assert result.exit_code == 0, result.output
    assert "5 held-out samples" in result.stdout
    cosines = dict(line.strip().split(": ") for line in result.stdout.splitlines() if line.startswith("  "))
    assert set(cosines) == {"ta", "tb"} and all(float(v) > 0.99 for v in cosines.values())
    return root


def _train(cache, save_dir, *extra):
    return runner.invoke(app, ["train", "--loader", "wds", "--root", str(cache), "--split", "train",
                               "--teachers", "ta,tb", "--converters", str(cache / "conv" / "converters.pt"),
                               "--classes", "4", "--batch", "8", "--epochs", "2", "--lr", "3e-3",
                               "--save_dir", str(save_dir), "--device", "cpu", "--quiet", *extra])


def test_train_then_eval(cache, tmp_path):
    result = _train(cache, tmp_path / "run", "--val-split", "test")
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and (tmp_path / "run" / "fusion_ep2.pt").is_file()
    result = runner.invoke(app, ["eval", "--loader", "wds", "--root", str(cache), "--split", "test",
                                 "--fusion", str(tmp_path / "run" / "fusion_ep2.pt"),
                                 "--out", str(tmp_path / "eval"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["count"] == 20 and len(report["confusion"]) == 4
    assert sum(map(sum, report["confusion"])) == 20 and report["top1"] > 50
    assert set(report["per_class"]) == {"c0", "c1", "c2", "c3"}
    assert (tmp_path / "eval" / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    last = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["val_top1"] == pytest.approx(report["top1"])  # the same evaluation, two ways


def _fails(result, *fragments):
    assert result.exit_code == 2, result.output
    err = result.stderr
    assert err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, err


def test_classes_smaller_than_the_labels(cache, tmp_path):
    result = runner.invoke(app, ["train", "--loader", "wds", "--root", str(cache), "--split", "train",
                                 "--teachers", "ta,tb", "--converters", str(cache / "conv" / "converters.pt"),
                                 "--classes", "2", "--save-dir", str(tmp_path / "r"), "--quiet"])
    _fails(result, "--classes 2", "has 4 classes")
    assert not (tmp_path / "r").exists()


def test_missing_converters_file(cache, tmp_path):
    result = runner.invoke(app, ["train", "--loader", "wds", "--root", str(cache), "--split", "train",
                                 "--teachers", "ta,tb", "--converters", str(tmp_path / "none.pt"),
                                 "--classes", "4", "--save-dir", str(tmp_path / "r"), "--quiet"])
    _fails(result, "--converters", "none.pt", "no such file")


def test_converters_of_another_student(cache, tmp_path):
    other = make_feature_cache(tmp_path / "c2", count=16)
    raw = torch.load(cache / "conv" / "converters.pt", weights_only=True)
    raw["student"]["dim"] = 99
    torch.save(raw, tmp_path / "wrong.pt")
    result = runner.invoke(app, ["train", "--loader", "wds", "--root", str(other), "--split", "train",
                                 "--teachers", "ta,tb", "--converters", str(tmp_path / "wrong.pt"),
                                 "--classes", "4", "--save-dir", str(tmp_path / "r"), "--quiet"])
    _fails(result, "wrong.pt", "width 99", "width 16")


def test_cache_of_another_student(cache, tmp_path):
    result = _train(cache, tmp_path / "r", "--student", "tiny-videomae")
    _fails(result, "--student tiny-videomae", "built with student 'tiny-student'")


def test_resume_from_another_configuration(cache, tmp_path):
    assert _train(cache, tmp_path / "r").exit_code == 0
    result = _train(cache, tmp_path / "r", "--resume", "--seed", "5")
    _fails(result, "--resume", "another configuration", "seed")
    result = _train(cache, tmp_path / "r", "--epochs", "3", "--resume")
    assert result.exit_code == 0, result.stderr


def test_unknown_loader_and_missing_cache(tmp_path):
    result = runner.invoke(app, ["train", "--loader", "lmdb", "--root", str(tmp_path), "--split", "train",
                                 "--teachers", "a", "--converters", "c.pt", "--classes", "3"])
    assert result.exit_code == 2 and "Invalid value for '--loader'" in result.stderr  # click's
    result = runner.invoke(app, ["train-converters", "--root", str(tmp_path / "nope"), "--split", "train",
                                 "--teachers", "a", "--save-dir", str(tmp_path / "o")])
    _fails(result, "nope", "no such cache directory")


def test_every_bad_argument_is_reported_at_once(tmp_path):
    result = runner.invoke(app, ["train", "--loader", "dali", "--root", str(tmp_path), "--split", "train",
                                 "--teachers", "a", "--converters", "c.pt", "--classes", "0",
                                 "--frames", "0", "--lr", "-1"])
    _fails(result, "--dataset: required", "--student: required", "--frames 0", "--classes 0", "--lr -1.0")


def test_corrupt_shard_stops_training_unless_skip_is_asked(cache, tmp_path):
    import shutil

    root = tmp_path / "cache"
    shutil.copytree(cache, root)
    shard = root / "synth-train-student-000001.tar"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 600] = b"\xc1" * 600   # garbage over a sample's members
    shard.write_bytes(bytes(raw))
    _fails(_train(root, tmp_path / "raise"), "synth-train-student-000001.tar")
    assert not list((tmp_path / "raise").glob("fusion_ep*.pt"))
    result = _train(root, tmp_path / "skip", "--on-error", "skip")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "skip" / "fusion_ep2.pt").is_file()
    records = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(epochs) == 2 and all(e["skipped"] > 0 and e["samples"] + e["skipped"] == 48
                                    for e in epochs)
    assert f"{epochs[-1]['skipped']} samples skipped" in result.stdout


def test_teachers_may_be_repeated_and_comma_separated(cache, tmp_path):
    result = runner.invoke(app, ["train", "--loader", "wds", "--root", str(cache), "--split", "train",
                                 "--teachers", "ta", "--teachers", " tb,", "--converters",
                                 str(cache / "conv" / "converters.pt"), "--classes", "4",
                                 "--epochs", "1", "--save-dir", str(tmp_path / "r"), "--device", "cpu",
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    assert "skipped" not in result.stdout  # nothing was left out
    ckpt = torch.load(tmp_path / "r" / "fusion_ep1.pt", weights_only=True)
    assert ckpt["config"]["teachers"] == ["ta", "tb"]


def test_corrupt_feature_values_stop_training_before_a_checkpoint(cache, tmp_path):
    # bytes flipped inside a tensor's data keep the tar and msgpack valid; the values turn nan
    import shutil
    import tarfile

    root = tmp_path / "cache"
    shutil.copytree(cache, root)
    shard = root / "synth-train-student-000001.tar"
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".student.mp"))
    raw = bytearray(shard.read_bytes())
    end = member.offset_data + member.size            # the raw float32 data ends the member
    raw[end - 64:end] = b"\xff" * 64                  # 16 float32 nans
    shard.write_bytes(bytes(raw))
    _fails(_train(root, tmp_path / "run", "--epochs", "1"), "the loss is nan",
           f"bombkd inspect {root} --split train --verify", "no checkpoint was written")
    assert not list((tmp_path / "run").glob("fusion_ep*.pt"))
    records = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "NaN" not in records  # metrics.jsonl stays strict JSON
