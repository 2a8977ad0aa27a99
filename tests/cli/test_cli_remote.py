"""The commands against a cache on S3 (moto's server on loopback): featurize --out s3://
(byte-identical to a local run, --dry-run, killed then --resume), train / eval from s3:// with
the shard cache, train-converters from s3://, 2 ranks under torchrun reading one remote cache,
and featurize over several ranks into a URL refused with the fix."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bombkd_io.sample_data import make_sample_data
from bombkd_train.cli.main import app
from bombkd_train.config import ConverterTrainConfig
from bombkd_train.converters import train_converters
from places import child_env
from synthetic_cache import TEACHERS, make_feature_cache

FEATURIZE = ["featurize", "--dataset", "ucf101", "--split", "train", "--student", "tiny-vjepa2",
             "--teachers", "tiny-videomae", "--shard-size", "2", "--batch", "2", "--workers",
             "1", "--device", "cpu", "--quiet"]
# the child is killed (SIGKILL) right after the progress record of its 2nd shard is uploaded
KILLED = r'''
import os, signal, sys
from bombkd_io.shards import publish
records = []
def record(self, path, _record=publish.Remote.record):
    _record(self, path)
    records.append(path)
    if len(records) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
publish.Remote.record = record
from bombkd_train.cli.main import app
app(sys.argv[1:])
'''


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    return make_sample_data(tmp_path_factory.mktemp("videos"), classes=3, per_class=3, seed=0)


@pytest.fixture(scope="module")
def local_features(videos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local")
    result = CliRunner().invoke(app, FEATURIZE + ["--root", str(videos), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def objects(s3, url: str) -> dict[str, bytes]:
    bucket, _, prefix = url[len("s3://"):].partition("/")
    client = s3.client()
    return {key.rsplit("/", 1)[-1]: client.get_object(Bucket=bucket, Key=key)["Body"].read()
            for key in (o["Key"] for o in client.list_objects_v2(
                Bucket=bucket, Prefix=prefix).get("Contents", []))}


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".")}


def test_featurize_to_s3_equals_a_local_run(s3, videos, local_features):
    url = f"s3://{s3.bucket()}/feats"
    dry = CliRunner().invoke(app, FEATURIZE + ["--root", str(videos), "--out", url, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert f"in 3 shard(s) per model to {url}" in dry.output
    assert objects(s3, url) == {}  # a dry run writes nothing
    result = CliRunner().invoke(app, FEATURIZE + ["--root", str(videos), "--out", url])
    assert result.exit_code == 0, result.output
    assert f"manifest: {url}/ucf101-train.index.json" in result.output
    assert objects(s3, url) == files(local_features)  # every shard and the manifest, bytewise
    again = CliRunner().invoke(app, FEATURIZE + ["--root", str(videos), "--out", url])
    assert "nothing to do" in again.output


def test_featurize_to_s3_killed_then_resumed(s3, videos, local_features, tmp_path):
    url = f"s3://{s3.bucket()}/feats"
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    proc = subprocess.run([sys.executable, str(script), *FEATURIZE, "--root", str(videos),
                           "--out", url], env={**child_env(), **s3.env}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    left = objects(s3, url)
    # two shards of each model and the progress record, no manifest: an unfinished cache
    assert sorted(left) == sorted([f"ucf101-train-{m}-00000{k}.tar" for m in
                                   ("student", "tiny-videomae") for k in (0, 1)] +
                                  ["ucf101-train.progress.json"])
    inspect = CliRunner().invoke(app, ["inspect", url])
    assert inspect.exit_code == 2 and "unfinished" in inspect.output and "--resume" in inspect.output
    bucket, prefix = url[5:].split("/", 1)  # one object damaged meanwhile: rewritten
    damaged = "ucf101-train-tiny-videomae-000001.tar"
    s3.client().put_object(Bucket=bucket, Key=f"{prefix}/{damaged}",
                           Body=b"\0" * len(left[damaged]))
    refused = CliRunner().invoke(app, FEATURIZE + ["--root", str(videos), "--out", url])
    assert refused.exit_code == 2 and "pass --resume" in refused.output
    result = CliRunner().invoke(app, FEATURIZE + ["--root", str(videos), "--out", url,
                                                  "--resume"])
    assert result.exit_code == 0, result.output
    assert objects(s3, url) == files(local_features)  # progress record gone, manifest there


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A synthetic cache (train + test) and converters fitted on it."""
    tmp = tmp_path_factory.mktemp("synth")
    root = make_feature_cache(tmp / "cache", count=32, shard_size=8)
    make_feature_cache(root, split="test", count=16, shard_size=8, seed=1)
    conv = train_converters(ConverterTrainConfig(root=str(root), split="train",
                                                 teachers=list(TEACHERS),
                                                 save_dir=str(tmp / "conv"), epochs=0,
                                                 batch_size=16))
    return root, conv.path


def losses(run: Path) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in lines if "step" in m and m.get("kind", "step") == "step"]


def train_args(root: str, conv: Path, save_dir: Path) -> list[str]:
    return ["train", "--loader", "wds", "--root", root, "--split", "train", "--teachers",
            ",".join(TEACHERS), "--converters", str(conv), "--classes", "4", "--batch", "4",
            "--epochs", "2", "--save-dir", str(save_dir), "--device", "cpu", "--quiet"]


def test_train_eval_and_converters_from_s3(s3, synth, tmp_path):
    root, conv = synth
    url = s3.upload(root, f"s3://{s3.bucket()}/feats")
    local = CliRunner().invoke(app, train_args(str(root), conv, tmp_path / "local"))
    assert local.exit_code == 0, local.output
    remote = CliRunner().invoke(app, train_args(url, conv, tmp_path / "remote") + [
        "--shard-cache", str(tmp_path / "sc"), "--shard-cache-limit", "10M"])
    assert remote.exit_code == 0, remote.output
    assert losses(tmp_path / "remote") == losses(tmp_path / "local")
    assert len(losses(tmp_path / "local")) >= 16
    assert sorted(p.name for p in (tmp_path / "sc").glob("*/*.tar")) == \
        sorted(p.name for p in root.glob("synth-train-student-*.tar"))
    evals = [CliRunner().invoke(app, ["eval", "--loader", "wds", "--root", r, "--split", "test",
                                      "--fusion", str(tmp_path / "local" / "fusion_ep2.pt"),
                                      "--out", str(tmp_path / f"eval{i}"), "--device", "cpu",
                                      "--quiet"]) for i, r in enumerate((str(root), url))]
    assert [e.exit_code for e in evals] == [0, 0], evals[1].output
    assert evals[0].output.splitlines()[0] == evals[1].output.splitlines()[0]  # same top-1/5
    fitted = [CliRunner().invoke(app, ["train-converters", "--root", r, "--split", "train",
                                       "--teachers", ",".join(TEACHERS), "--epochs", "1",
                                       "--save-dir", str(tmp_path / f"conv{i}"), "--device",
                                       "cpu", "--quiet"]) for i, r in enumerate((str(root), url))]
    assert [f.exit_code for f in fitted] == [0, 0], fitted[1].output
    cosines = [[line for line in f.output.splitlines() if line.startswith("  ")] for f in fitted]
    assert cosines[0] == cosines[1] and len(cosines[0]) == len(TEACHERS)  # same fit
    bad = CliRunner().invoke(app, train_args(url, conv, tmp_path / "bad") + [
        "--shard-cache-limit", "lots"])
    assert bad.exit_code == 2 and "--shard-cache-limit" in bad.output


@pytest.mark.slow
def test_two_ranks_under_torchrun_read_one_s3_cache(s3, synth, tmp_path):
    root, conv = synth
    url = s3.upload(root, f"s3://{s3.bucket()}/feats")
    script = tmp_path / "bombkd_cli.py"
    script.write_text("from bombkd_train.cli.main import app\napp()\n")
    runs = {}
    for name, where, extra in (("local", str(root), []),
                               ("s3", url, ["--shard-cache", str(tmp_path / "sc")])):
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
             "2", str(script), *train_args(where, conv, tmp_path / name), *extra],
            env={**child_env(), **s3.env}, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = losses(tmp_path / name)
    assert runs["s3"] == runs["local"] and len(runs["local"]) >= 8
    # the two ranks of this node shared the shard cache: each shard downloaded once
    assert sorted(p.name for p in (tmp_path / "sc").glob("*/*.tar")) == \
        sorted(p.name for p in root.glob("synth-train-student-*.tar"))


def test_several_ranks_with_a_url_out_are_refused_with_the_fix(s3, videos, tmp_path):
    url = f"s3://{s3.bucket()}/ranks"
    args = FEATURIZE + ["--root", str(videos), "--out", url]
    refused = "a URL is written by one featurize process, not by several"
    for extra, how in ((["--rank", "1", "--world-size", "2"], "--rank/--world-size"),
                       (["--finalize"], "--finalize")):
        got = CliRunner().invoke(app, [*args, *extra])
        assert got.exit_code == 2 and f"{refused} ({how})" in got.output, (extra, got.output)
        assert "copy the finished cache" in got.output and "manifest last" in got.output
    script = tmp_path / "bombkd_cli.py"
    script.write_text("from bombkd_train.cli.main import app\napp()\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(script), *args],
                          env={**child_env(), **s3.env}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and f"{refused} (torchrun)" in proc.stdout + proc.stderr, \
        proc.stderr[-3000:]
    assert objects(s3, url) == {}  # nothing published
