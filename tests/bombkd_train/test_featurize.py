"""featurize on a small generated dataset with the tiny backbones: layout, alignment, adding a
teacher, --resume, --dry-run, refusals, and the CLI."""
from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bombkd_io.datasets import index_dataset, item_key
from bombkd_io.errors import ConfigError
from bombkd_io.shards.manifest import load_manifest, manifest_path
from bombkd_io.shards.reader import read_shard
from bombkd_io.video import ClipLoader, probe_videos
from bombkd_train.backbones import create_backbone
from bombkd_train.cli.main import app
from bombkd_train.config import DataConfig, FeaturizeConfig, pinned
from bombkd_train.data import open_source
from bombkd_train.featurize import estimate_featurize, featurize
from bombkd_train.featurize import run as featurize_run
from conftest import BROKEN
from faults import failing_decode

STUDENT, TEACHERS = "tiny-vjepa2", ["tiny-videomae", "tiny-timesformer", "tiny-vivit"]
def config(root: Path, out: Path, teachers=TEACHERS, **kw) -> FeaturizeConfig:
    base = dict(dataset="ucf101", root=str(root), split="train", student=STUDENT, out=str(out),
                teachers=list(teachers), shard_size=3, batch_size=2, decode_threads=1)
    return FeaturizeConfig(**(base | kw))


def digests(out: Path) -> dict[str, tuple[str, int]]:
    """Every shard file: (sha256, mtime_ns)."""
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(out.glob("*.tar"))}


def read(root: Path, model, k: int = 0, labels: bool = False):
    """Shard ``k`` of ``model`` (a manifest's entry), read as the cached loader reads it."""
    return read_shard(root / model.shards[k].name, model.shards[k], model, labels=labels)


def metas(shard: Path) -> dict[str, dict]:
    """key -> the sample's KEY.json, read with the standard library (as any tool would)."""
    with tarfile.open(shard) as tar:
        return {m.name.split(".")[0]: json.loads(tar.extractfile(m).read())
                for m in tar if m.name.endswith(".json")}


@pytest.fixture(scope="module")
def full_cache(small_root, tmp_path_factory) -> Path:
    """Student + three teachers in one pass (two decode needs: 16x112 and 16x64)."""
    out = tmp_path_factory.mktemp("full")
    featurize(config(small_root, out))
    return out


def test_config_reports_every_problem_before_any_io(tmp_path):
    bad = FeaturizeConfig(dataset="kinetics", root=str(tmp_path / "missing"), split="train",
                          student="no-such-model", out=str(tmp_path / "out"),
                          teachers=["tiny-vivit", "tiny-vivit"], dtype="int8", pooling="max",
                          shard_size=0, format="pkl", device="tpu")
    with pytest.raises(ConfigError) as err:
        featurize(bad)
    text = str(err.value)
    for piece in ("--dataset 'kinetics'", "--format 'pkl'", "--dtype 'int8'", "--pool 'max'", "--shard-size 0: must be >= 1",
                  "--device 'tpu'", "unknown backbone 'no-such-model'", "'tiny-vivit' is given twice",
                  "--root"):
        assert piece in text
    assert not (tmp_path / "out").exists()


def test_layout_alignment_and_student_members(full_cache, small_root):
    m = load_manifest(full_cache, "train", "ucf101")
    index = index_dataset("ucf101", small_root, "train")
    assert list(m.models) == ["student", *TEACHERS]
    assert m.count == 8 and [s.count for s in m.models["student"].shards] == [3, 3, 2]
    assert [f["path"] for f in m.failed] == [index.items[BROKEN].path] and m.failed[0]["reason"]
    shapes = {name: (e.tokens, e.dim) for name, e in m.models.items()}
    assert shapes == {"student": (8, 96), "tiny-videomae": (8, 64), "tiny-timesformer": (16, 128),
                      "tiny-vivit": (8, 80)}
    expected = [item_key(i, it) for i, it in enumerate(index.items) if i != BROKEN]
    for k in range(3):
        keys = {name: read(full_cache, e, k).keys for name, e in m.models.items()}
        assert all(v == expected[3 * k:3 * k + len(v)] for v in keys.values()), keys
        student = read(full_cache, m.models["student"], k, labels=True)
        meta = metas(full_cache / m.models["student"].shards[k].name)
        assert student.features.dtype == np.float16
        for key, label in zip(student.keys, student.labels.tolist()):
            item = index.items[int(key[:6])]
            assert label == item.label
            assert meta[key]["path"] == item.path and meta[key]["class_name"] == item.class_name
            assert len(meta[key]["frame_indices"]) == 16 and meta[key]["fps"] > 0


def test_features_match_the_video_path(full_cache, small_root):
    """The cached fp16 features are the backbone on the decoder's clip, rounded to fp16."""
    m = load_manifest(full_cache, "train", "ucf101")
    index = index_dataset("ucf101", small_root, "train")
    infos, _ = probe_videos([it.path for it in index.items])
    for name in ("student", "tiny-timesformer"):
        bb = create_backbone(m.models[name].backbone)
        loader = ClipLoader(infos, frames=bb.frames, size=bb.size, batch_size=2, num_threads=1)
        (batch,) = list(loader.batches([[0, 1]]))
        direct = bb(batch.clips).numpy()                          # [2, T', D]
        cached = read(full_cache, m.models[name]).features
        np.testing.assert_allclose(cached[:2].astype(np.float32), direct,
                                   rtol=1e-3, atol=1e-3)


def test_dry_run_is_exact_and_writes_nothing(small_root, tmp_path):
    out = tmp_path / "cache"
    cfg = config(small_root, out, teachers=["tiny-vivit"], split="test", shard_size=2)
    estimate = estimate_featurize(cfg)
    assert not out.exists()
    assert (estimate.samples, estimate.shards) == (3, 2) and estimate.fits
    m = featurize(cfg)
    assert estimate.per_model == {name: e.bytes for name, e in m.models.items()}


def test_add_a_teacher_touches_nothing_else(full_cache, small_root, tmp_path):
    out = tmp_path / "cache"
    featurize(config(small_root, out, teachers=TEACHERS[:2]))
    before = digests(out)
    estimate = estimate_featurize(config(small_root, out, teachers=TEACHERS))
    assert digests(out) == before
    m = featurize(config(small_root, out, teachers=TEACHERS))
    assert estimate.per_model == {"tiny-vivit": m.models["tiny-vivit"].bytes}
    after = digests(out)
    assert {k: after[k] for k in before} == before  # same bytes, same mtimes
    added = sorted(set(after) - set(before))
    assert added == sorted(s.name for s in m.models["tiny-vivit"].shards)
    full = digests(full_cache)
    assert all(after[name][0] == full[name][0] for name in added)  # as if made in one pass
    assert list(m.models) == ["student", *TEACHERS]


def test_resume_redoes_broken_shards_byte_identically(full_cache, small_root, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(full_cache, out)
    (out / "ucf101-train-student-000001.tar").unlink()
    (out / "ucf101-train-tiny-vivit-000002.tar").write_bytes(b"corrupt")
    (out / "ucf101-train-tiny-videomae-000000.tar.tmp").write_bytes(b"half a shard")
    kept = {k: v for k, v in digests(out).items() if "student-000001" not in k
            and "vivit-000002" not in k}
    featurize(config(small_root, out, resume=True))
    after = digests(out)
    assert {k: after[k] for k in kept} == kept
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in digests(full_cache).items()}
    assert not list(out.glob("*.tmp"))
    assert manifest_path(out, "ucf101", "train").read_bytes() == \
        manifest_path(full_cache, "ucf101", "train").read_bytes()


def test_interrupted_run_resumes_to_the_same_bytes(full_cache, small_root, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    real, calls = featurize_run.save_progress, []

    def crash_after_two_shards(state, where):
        real(state, where)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(featurize_run, "save_progress", crash_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        featurize(config(small_root, out))
    monkeypatch.undo()
    assert not manifest_path(out, "ucf101", "train").exists()
    assert (out / "ucf101-train.progress.json").exists()
    with pytest.raises(ConfigError, match="pass --resume"):
        featurize(config(small_root, out))
    featurize(config(small_root, out, resume=True))
    assert {k: v[0] for k, v in digests(out).items()} == \
        {k: v[0] for k, v in digests(full_cache).items()}
    assert not (out / "ucf101-train.progress.json").exists()


def test_refuses_a_different_cache(full_cache, small_root, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(full_cache, out)
    before = digests(out)
    for change, words in ((dict(student="tiny-videomae"), "student backbone"),
                          (dict(shard_size=4), "shard size"), (dict(dtype="float32"), "dtype")):
        for resume in (False, True):
            with pytest.raises(ConfigError, match=words):
                featurize(config(small_root, out, resume=resume, **change))
    assert digests(out) == before
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "ucf101-train-student-000000.tar").write_bytes(b"x")
    with pytest.raises(ConfigError, match="no manifest; pass --resume"):
        featurize(config(small_root, stray))


def test_cli_featurize_dry_run_and_errors(small_root, tmp_path):
    runner = CliRunner()
    args = ["featurize", "--dataset", "ucf101", "--root", str(small_root), "--split", "train",
            "--student", STUDENT, "--teachers", "tiny-videomae,tiny-vivit", "--out",
            str(tmp_path / "c"), "--format", "wds", "--shard_size", "4", "--batch", "4",
            "--workers", "1", "--fp16"]
    dry = runner.invoke(app, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would write 9 samples in 3 shard(s)" in dry.output and "fits" in dry.output
    assert not (tmp_path / "c").exists()
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "featurized 8 clips (1 failed)" in done.output and "clips/s" in done.output
    m = load_manifest(tmp_path / "c", "train", "ucf101")
    assert list(m.models) == ["student", "tiny-videomae", "tiny-vivit"] and m.shard_size == 4
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "nothing to do" in again.output
    bad = runner.invoke(app, [*args[:-1], "--dtype", "float32", "--fp16"])
    assert bad.exit_code == 2 and "contradict" in bad.output
    other = runner.invoke(app, [*args[:8], "tiny-vivit", *args[9:]])
    assert other.exit_code == 2 and "error:" in other.output and "student backbone" in other.output


def test_float32_cache_equals_the_backbone_exactly(small_root, tmp_path):
    out = tmp_path / "fp32"
    m = featurize(config(small_root, out, teachers=[], dtype="float32", shard_size=8))
    index = index_dataset("ucf101", small_root, "train")
    infos, _ = probe_videos([it.path for it in index.items])
    bb = create_backbone(STUDENT)
    clips = next(ClipLoader(infos, frames=16, size=112, batch_size=2, num_threads=1)
                 .batches([[0, 1]])).clips
    cached = read(out, m.models["student"]).features
    torch.testing.assert_close(torch.from_numpy(cached[:2].copy()), bb(clips),
                               rtol=0, atol=1e-5)


def test_decode_failure_mid_run_is_skipped_recorded_and_replayed(small_root, tmp_path,
                                                                 monkeypatch):
    """A video that probes fine but fails to decode: skipped, recorded, and the shard takes the
    next video so shards stay full; --resume replays the same plan to the same bytes."""
    index = index_dataset("ucf101", small_root, "train")
    victim = index.items[1].path
    monkeypatch.setattr(ClipLoader, "decode_batch", failing_decode(victim))
    out = tmp_path / "cache"
    m = featurize(config(small_root, out, teachers=["tiny-vivit"]))
    assert m.count == 7 and [s.count for s in m.models["student"].shards] == [3, 3, 1]
    assert {"path": victim, "reason": "injected decode error"} in m.failed
    keys = read(out, m.models["tiny-vivit"]).keys
    assert keys == [item_key(i, index.items[i]) for i in (0, 2, 3)]
    first = {k: v[0] for k, v in digests(out).items()}
    (out / m.models["student"].shards[0].name).unlink()
    (out / m.models["tiny-vivit"].shards[1].name).unlink()
    featurize(config(small_root, out, teachers=["tiny-vivit"], resume=True))
    assert {k: v[0] for k, v in digests(out).items()} == first


def test_manifest_records_the_built_in_weights(full_cache):
    """A tiny built-in: the sha256 of its initial state dict, float32, its normalisation."""
    m = load_manifest(full_cache, "train")
    for role, name in (("student", STUDENT), ("tiny-vivit", "tiny-vivit")):
        digest = hashlib.sha256()
        for key, tensor in sorted(create_backbone(name).model.state_dict().items()):
            digest.update(key.encode() + tensor.contiguous().numpy().tobytes())
        e = m.models[role]
        assert e.weights == "state-sha256:" + digest.hexdigest()
        assert (e.source, e.revision, e.model_dtype, e.bombkd is not None) == (
            None, None, "float32", True)
    assert m.models["tiny-vivit"].mean == [0.5, 0.5, 0.5]
    with pytest.raises(ConfigError, match="tiny-vjepa2 is random-initialised .* no revisions"):
        create_backbone(STUDENT, revision="v1")


def test_local_directory_student_is_traced_and_pinned(small_root, tmp_path):
    """A save_pretrained directory: the sha256 of its files; its revision is recorded, and a
    run asking another revision, other frames, or other weights for its shards is refused."""
    folder = tmp_path / "student"
    create_backbone(STUDENT).model.save_pretrained(folder)
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    out = tmp_path / "cache"
    m = featurize(config(small_root, out, teachers=[], student=str(folder), revision="v1"))
    e = m.models["student"]
    assert (e.source, e.revision, e.weights) == (
        str(folder), "v1", "files-sha256:" + digest.hexdigest())
    assert (e.frames, e.size, e.pooling, e.mean) == (16, 112, "time", [0.485, 0.456, 0.406])
    for change, words in ((dict(revision="v2"), "student revision is 'v1' there, this run "
                                                "asks for 'v2'"),
                          (dict(frames=8), "student frames is 16 there")):
        with pytest.raises(ConfigError, match=words):
            featurize(config(small_root, out, teachers=[], student=str(folder), **change))
    other = create_backbone(STUDENT).model
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    other.save_pretrained(folder)  # same path, other weights
    (out / e.shards[0].name).unlink()
    with pytest.raises(ConfigError, match="student .*: weights is 'files-sha256:.*' in the cache"):
        featurize(config(small_root, out, teachers=[], student=str(folder), resume=True))


def test_video_mode_replays_the_caches_revision_and_refuses_other_weights(small_root, tmp_path):
    """Video mode on a --cache loads the student at the revision the cache recorded; another
    --revision, or other weights under the same path, is refused before any training."""
    folder = tmp_path / "student"
    create_backbone(STUDENT).model.save_pretrained(folder)
    out = tmp_path / "cache"
    featurize(config(small_root, out, teachers=[], student=str(folder), revision="v1"))

    def source(**kw):
        return open_source(DataConfig(loader="dali", root=str(small_root), dataset="ucf101",
                                      student=str(folder), cache=str(out), device="cpu", **kw),
                           "train")

    replayed = source()
    assert replayed.loader.backbone.revision == "v1"
    replayed.loader.close()
    with pytest.raises(ConfigError, match="--revision v2: the cache at .* holds revision=v1"):
        source(revision="v2")
    other = create_backbone(STUDENT).model
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    other.save_pretrained(folder)  # same path, other weights
    with pytest.raises(ConfigError, match="its weights are files-sha256:.*, the cache .* was "
                                          "featurized with files-sha256:"):
        source()


def test_a_teacher_is_pinned_with_name_at_revision(small_root, tmp_path):
    """``--teachers NAME@REV`` loads that teacher at REV and records it; adding it again at
    another revision is refused; an ``@`` inside a folder path is not a revision."""
    folder = tmp_path / "teacher"
    create_backbone("tiny-videomae").model.save_pretrained(folder)
    out = tmp_path / "cache"
    m = featurize(config(small_root, out, teachers=[f"{folder}@v1"]))
    assert (m.models["teacher"].source, m.models["teacher"].revision) == (str(folder), "v1")
    with pytest.raises(ConfigError, match=r"teacher 'teacher' there is .*revision v1"):
        featurize(config(small_root, out, teachers=[f"{folder}@v2"]))
    assert pinned("/data/m@2/x") == ("/data/m@2/x", None)
    assert pinned("org/name@main") == ("org/name", "main")
