"""The sample dataset: layout, variety, determinism, every codec, and that classes are learnable."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from bombkd_io.datasets import index_dataset
from bombkd_io.sample_data import make_sample_data
from bombkd_io.video import decode_clip, probe_videos


def _hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_ucf101_layout_and_lists(sample_root):
    lists = sample_root / "ucfTrainTestlist"
    classes = (lists / "classInd.txt").read_text().split()
    assert classes[0::2] == [str(i) for i in range(1, 7)]
    videos = sorted(sample_root.glob("*/v_*_g*_c01.webm"))
    assert len(videos) == 18
    train = (lists / "trainlist01.txt").read_text().splitlines()
    test = (lists / "testlist01.txt").read_text().splitlines()
    assert len(train) == 12 and len(test) == 6            # one of three groups per class tests
    assert train[0].split()[1] == "1" and "_g01_" in test[0] and len(test[0].split()) == 1


def test_clips_vary_in_length_size_and_fps(sample_root):
    infos, failed = probe_videos(sorted(sample_root.glob("*/*.webm")))
    assert not failed and {i.codec for i in infos} == {"vp9"}
    lengths = [i.num_frames for i in infos]
    assert min(lengths) < 16 <= max(lengths) and min(lengths) >= 10 and max(lengths) <= 48
    assert len({(i.width, i.height) for i in infos}) >= 3
    assert all(i.width % 2 == 0 and i.height % 2 == 0 for i in infos)
    assert len({i.fps for i in infos}) >= 3


def test_same_seed_writes_identical_bytes_for_every_codec(tmp_path):
    a = make_sample_data(tmp_path / "a", classes=2, per_class=4, codec="mixed", seed=3)
    b = make_sample_data(tmp_path / "b", classes=2, per_class=4, codec="mixed", seed=3)
    assert _hashes(a) == _hashes(b)
    infos, failed = probe_videos(sorted(a.glob("*/v_*")))
    assert not failed and {i.codec for i in infos} == {"vp9", "h264", "mpeg4", "mjpeg"}
    c = make_sample_data(tmp_path / "c", classes=2, per_class=4, codec="mixed", seed=4)
    assert _hashes(a) != _hashes(c)


def test_unknown_codec_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown codec 'av1'"):
        make_sample_data(tmp_path, codec="av1")


def _features(paths):
    clips = np.stack([decode_clip(p, frames=8, size=32) for p in paths]).astype(np.float32)
    colour = clips.reshape(len(paths), -1, 3).std(axis=1)            # [N, 3] colour spread
    motion = np.abs(np.diff(clips, axis=1)).mean(axis=(1, 2, 3, 4))  # [N] how much moves
    return colour, motion


def test_classes_are_learnable_and_move(sample_root):
    train = index_dataset("ucf101", sample_root, "train")
    test = index_dataset("ucf101", sample_root, "test")
    x_train, motion = _features([i.path for i in train.items])
    x_test, _ = _features([i.path for i in test.items])
    y_train = np.array([i.label for i in train.items])
    centroids = np.stack([x_train[y_train == c].mean(0) for c in range(6)])   # [6, 3]
    predicted = np.argmin(((x_test[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = (predicted == np.array([i.label for i in test.items])).mean()
    assert accuracy >= 5 / 6, f"nearest-centroid accuracy {accuracy:.2f}"
    assert motion.min() > 0.2, "every clip should have visible motion"
