"""Silent wrong data gets a word: damaged and truncated videos that still decode are recorded
(``suspect``) and listed by ``bombkd inspect``, ``--strict`` leaves them out; a folder split with
no folder is refused; empty class folders warn; featurize names its failed videos; video mode
counts unreadable videos in the epoch record's ``skipped``.

The videos are real (``make_sample_data``), damaged here the way files get damaged: 4,000
random bytes written over the middle of a vp9 file, a file cut just after its first frame.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bombkd_io.datasets import index_dataset
from bombkd_io.errors import DatasetError, DataWarning
from bombkd_io.sample_data import class_specs, encode_video, make_sample_data, render_clip
from bombkd_io.sampling import sample_indices
from bombkd_io.shards.manifest import load_manifest
from bombkd_io.video import ClipLoader, probe_video, probe_videos
from bombkd_io.video.health import repeated_frames
from bombkd_train.checkpoint import save_checkpoint
from bombkd_train.cli.main import app
from bombkd_train.converters import Converter, converters_checkpoint
from bombkd_train.config import DataConfig, FeaturizeConfig, TrainConfig
from bombkd_train.featurize import FeaturizeStats, featurize
from bombkd_train.trainer import train

STUDENT = "tiny-vjepa2"
runner = CliRunner()


def overwrite_middle(path: Path, count: int = 4000, seed: int = 0) -> None:
    """``count`` random bytes over the middle of the file (a bad sector, a broken copy)."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2 - count // 2
    data[start:start + count] = np.random.default_rng(seed).integers(0, 256, count,
                                                                     np.uint8).tobytes()
    path.write_bytes(bytes(data))


def keep_first_frame(path: Path) -> None:
    """Cut the file in the middle of its second frame: only the first one can decode."""
    with av.open(str(path)) as container:
        packets = [p for p in container.demux(container.streams.video[0]) if p.size]
    path.write_bytes(path.read_bytes()[:packets[1].pos + packets[1].size // 2])


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A small UCF101-layout dataset whose train split holds a damaged, a truncated and an
    unreadable video among clean ones; returns the root and kind -> path."""
    root = make_sample_data(tmp_path_factory.mktemp("wrong") / "ucf", classes=2, per_class=5,
                            seed=0)
    infos, _ = probe_videos([it.path for it in index_dataset("ucf101", root, "train").items])
    longest = sorted(infos, key=lambda info: -info.num_frames)
    paths = {"damaged": longest[0].path, "truncated": longest[1].path,
             "unreadable": longest[-1].path}
    overwrite_middle(Path(paths["damaged"]))
    keep_first_frame(Path(paths["truncated"]))
    Path(paths["unreadable"]).write_bytes(b"\x1aE\xdf\xa3 this is not a video" * 10)
    return Path(root), paths


def config(root: Path, out: Path, **kw) -> FeaturizeConfig:
    return FeaturizeConfig(**(dict(dataset="ucf101", root=str(root), split="train",
                                   student=STUDENT, out=str(out), shard_size=4, batch_size=2,
                                   decode_threads=1) | kw))


@pytest.fixture(scope="module")
def cache(videos, tmp_path_factory) -> Path:
    root, _ = videos
    out = tmp_path_factory.mktemp("cache")
    featurize(config(root, out))
    return out


def test_damaged_and_truncated_videos_are_cached_but_recorded(videos, cache):
    root, paths = videos
    m = load_manifest(cache, "train", "ucf101")
    train_count = len(index_dataset("ucf101", root, "train").items)
    assert m.count == train_count - 1                       # only the unreadable one is left out
    assert [f["path"] for f in m.failed] == [paths["unreadable"]]
    suspect = {s["path"]: s["reason"] for s in m.suspect}
    assert set(suspect) == {paths["damaged"], paths["truncated"]}   # the clean ones are not
    # libav's own words on the damage, and the frames the demuxer lost to it
    assert suspect[paths["damaged"]].startswith("libav matroska,webm: ")
    assert "frames the container claims are in the file" in suspect[paths["damaged"]]
    # cut after its first frame: the one frame, sampled 16 times, would look like a still
    assert re.search(r"only 1 of the \d+ frames the container claims", suspect[paths["truncated"]])


def test_inspect_lists_suspect_videos(videos, cache):
    _, paths = videos
    result = runner.invoke(app, ["inspect", str(cache)])
    assert result.exit_code == 0, result.output
    assert "suspect videos" in result.output and "--strict" in result.output
    assert paths["damaged"] in result.output and paths["truncated"] in result.output


def test_strict_leaves_them_out_and_the_summary_names_them(videos, tmp_path):
    root, paths = videos
    out = tmp_path / "strict"
    result = runner.invoke(app, ["featurize", "--dataset", "ucf101", "--root", str(root),
                                 "--split", "train", "--student", STUDENT, "--out", str(out),
                                 "--shard-size", "4", "--batch", "2", "--workers", "1",
                                 "--strict"])
    assert result.exit_code == 0, result.output
    assert "(3 failed)" in result.output and f"bombkd inspect {out}" in result.output
    for path in paths.values():
        assert f"failed: {path}: " in result.output
    m = load_manifest(out, "train", "ucf101")
    assert {f["path"] for f in m.failed} == set(paths.values()) and not m.suspect
    strict = [f for f in m.failed if f["path"] != paths["unreadable"]]
    assert all(f["reason"].startswith("suspect, left out by --strict: ") for f in strict)
    assert m.count == len(index_dataset("ucf101", root, "train").items) - 3


def test_strict_never_removes_videos_a_cache_already_holds(videos, cache, tmp_path):
    """Adding a teacher with --strict: the shards' samples are fixed, so the suspect videos
    stay in (and stay listed); the teacher's shards hold the same samples."""
    root, _ = videos
    out = tmp_path / "cache"
    shutil.copytree(cache, out)
    before = load_manifest(out, "train", "ucf101")
    after = featurize(config(root, out, teachers=["tiny-vivit"], strict=True))
    assert list(after.models) == ["student", "tiny-vivit"] and after.count == before.count
    assert (after.failed, after.suspect) == (before.failed, before.suspect)


def test_clean_and_short_videos_are_not_flagged(codec_videos, tmp_path):
    short = tmp_path / "short.webm"      # 10 frames: a 16-frame clip repeats frames by the rule
    encode_video(render_clip(class_specs(6)[4], np.random.default_rng(1), 10, 160, 120), short,
                 "vp9", fps=25)
    paths = [*codec_videos.values(), short]          # every codec, both decode routes
    infos = [probe_video(p) for p in paths]
    assert [info.warnings for info in infos] == [()] * len(paths)
    assert len(np.unique(sample_indices(infos[-1].num_frames, 16))) == 10
    with ClipLoader(infos, frames=16, size=32, batch_size=len(paths), num_threads=1) as loader:
        batch = loader.decode_batch(range(len(paths)))
    assert batch.positions == list(range(len(paths))) and batch.warnings == {}


def test_pyav_route_records_the_decoders_errors(codec_videos, tmp_path):
    """h264 decodes through PyAV on the CPU: libav's errors on a damaged frame are captured."""
    good = codec_videos["h264"]
    with av.open(str(good)) as container:
        packets = [p for p in container.demux(container.streams.video[0]) if p.size]
    data = bytearray(good.read_bytes())
    start, end = packets[5].pos + packets[5].size // 3, packets[5].pos + packets[5].size - 2
    data[start:end] = np.random.default_rng(5).integers(0, 256, end - start, np.uint8).tobytes()
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(bytes(data))
    infos = [probe_video(damaged), probe_video(good)]
    assert infos[0].route == "pyav" and infos[0].warnings == ()   # the probe reads frame 0 only
    with ClipLoader(infos, frames=16, size=32, batch_size=2, num_threads=1) as loader:
        batch = loader.decode_batch([0, 1])
    assert batch.positions == [0, 1] and list(batch.warnings) == [0]
    assert batch.warnings[0][0].startswith("libav h264: ")


def test_repeated_frames_counts_only_repeats_that_were_not_asked_for():
    a, b = torch.full((4, 4, 3), 10, dtype=torch.uint8), torch.full((4, 4, 3), 200, dtype=torch.uint8)
    black = torch.zeros_like(a)
    clips = torch.stack([torch.stack([a, b, a, b]),          # all distinct
                         torch.stack([a, a, b, b]),          # repeats the sampling rule asked for
                         torch.stack([a, a, a, a]),          # one frame, four times
                         torch.stack([a, black, black, black])])  # one frame, padded
    indices = [np.array([0, 1, 2, 3]), np.array([0, 0, 1, 1]), np.array([0, 1, 2, 3]),
               np.array([0, 1, 2, 3])]
    assert repeated_frames(clips, indices) == [0, 0, 3, 2]


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00")       # indexing checks names only; it never decodes


def test_folder_split_without_a_folder_is_refused_and_all_takes_the_folder(tmp_path):
    flat = tmp_path / "flat"
    for cls in ("a_run", "b_walk"):
        _touch(flat / cls / f"{cls}_1.mp4")
    with pytest.raises(DatasetError) as err:
        index_dataset("folder", flat, "test")
    for piece in (str(flat), "no 'test' folder", "[a_run, b_walk]", "--split all"):
        assert piece in str(err.value)
    index = index_dataset("folder", flat, "all")
    assert index.classes == ["a_run", "b_walk"] and len(index.items) == 2
    out = tmp_path / "out"
    result = runner.invoke(app, ["featurize", "--dataset", "folder", "--root", str(flat),
                                 "--split", "test", "--student", STUDENT, "--out", str(out)])
    assert result.exit_code == 2 and "--split all" in result.stderr and not out.exists()


def test_class_folders_without_videos_warn(tmp_path):
    flat = tmp_path / "flat"
    _touch(flat / "a_run" / "x.mp4")
    (flat / "b_notes").mkdir()
    with pytest.warns(DataWarning, match=r"b_notes: class folder 1 holds no video files"):
        index = index_dataset("folder", flat, "all")
    assert index.classes == ["a_run", "b_notes"]             # the ids do not change
    top = tmp_path / "top"                                   # --root one level too high
    _touch(top / "ucf" / "a_run" / "x.mp4")
    with pytest.warns(DataWarning, match="one level too high"):
        with pytest.raises(DatasetError, match="has no videos"):
            index_dataset("folder", top, "all")


def test_featurize_summary_names_a_few_failed_videos():
    failed = [{"path": f"/data/v{i}.webm", "reason": f"reason {i}"} for i in range(5)]
    text = FeaturizeStats(clips=7, failed=5, failed_videos=failed).summary("OUT")
    assert text.startswith("featurized 7 clips (5 failed) in ")
    named = [line for line in text.splitlines() if line.startswith("  failed: ")]
    assert named == [f"  failed: /data/v{i}.webm: reason {i}" for i in range(3)]
    assert "... and 2 more failed" in text and text.endswith("`bombkd inspect OUT`")
    assert FeaturizeStats(clips=7).summary("OUT").count("\n") == 0   # nothing to name


def test_video_mode_counts_unreadable_videos_in_the_epoch_record(videos, tmp_path):
    root, paths = videos
    teacher = Converter(96, 8, 8, 4)     # tiny-vjepa2 gives [8, 96]; an untrained converter
    conv = save_checkpoint(converters_checkpoint(
        {"t": teacher}, student={"backbone": STUDENT, "dim": 96, "tokens": 8}, val_cosine={},
        config={}), tmp_path / "conv.pt")
    train_count = len(index_dataset("ucf101", root, "train").items)
    with pytest.warns(DataWarning, match=r"1 of the \d+ train videos .* cannot be read"):
        data = DataConfig(loader="dali", root=str(root), dataset="ucf101", student=STUDENT,
                          batch_size=4, device="cpu")
        result = train(TrainConfig(data=data, split="train", teachers=["t"], converters=str(conv),
                                   classes=2, epochs=1, save_dir=str(tmp_path / "run"),
                                   progress=False))
    assert result.last["skipped"] == 1 and result.last["samples"] == train_count - 1
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["skipped"] for r in records if r["kind"] == "epoch"] == [1]
