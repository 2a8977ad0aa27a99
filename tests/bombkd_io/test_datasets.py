"""Indexers: UCF101 / HMDB51 official layouts, class folders, csv / jsonl manifests, errors."""
from __future__ import annotations

import json
import shutil

import pytest

from bombkd_io.datasets import VideoItem, index_dataset, item_key
from bombkd_io.errors import DataWarning, DatasetError


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00")       # indexing checks existence; it never decodes


def test_ucf101_follows_the_split_files(sample_root):
    train = index_dataset("ucf101", sample_root, "train")
    test = index_dataset("ucf101", sample_root, "test")
    class_ind = (sample_root / "ucfTrainTestlist" / "classInd.txt").read_text().split()
    assert train.classes == class_ind[1::2]
    assert (len(train.items), len(test.items)) == (12, 6)
    lines = (sample_root / "ucfTrainTestlist" / "trainlist01.txt").read_text().splitlines()
    assert [i.path for i in train.items] == [str(sample_root / ln.split()[0]) for ln in lines]
    assert all(int(ln.split()[1]) - 1 == i.label for ln, i in zip(lines, train.items))
    assert all(train.classes[i.label] == i.class_name for i in train.items + test.items)


def test_ucf101_other_folds_and_missing_videos(tmp_path, sample_root):
    root = tmp_path / "ucf"
    shutil.copytree(sample_root / "ucfTrainTestlist", root / "ucfTrainTestlist")
    lists = root / "ucfTrainTestlist"
    (lists / "testlist03.txt").write_text("SlideLeftBox/v_SlideLeftBox_g01_c01.webm\r\n")
    _touch(root / "SlideLeftBox" / "v_SlideLeftBox_g01_c01.webm")
    assert [i.label for i in index_dataset("ucf101", root, "test3").items] == [1]
    with pytest.raises(DatasetError, match="trainlist02.txt"):
        index_dataset("ucf101", root, "train2")
    with pytest.raises(DatasetError, match=r"testlist01.txt: names .*g01_c01.webm"):
        index_dataset("ucf101", root, "test")
    with pytest.raises(DatasetError, match="unknown split 'val'"):
        index_dataset("ucf101", root, "val")


def test_hmdb51_split_flags(tmp_path):
    splits = tmp_path / "testTrainMulti_7030_splits"
    for name, flags in {"brush_hair": "1 2 0", "wave": "2 1 1"}.items():
        rows = [f"{name}_{k}.avi {flag}" for k, flag in enumerate(flags.split())]
        splits.mkdir(exist_ok=True)
        (splits / f"{name}_test_split1.txt").write_text("\n".join(rows) + "\n")
        for k in range(3):
            _touch(tmp_path / name / f"{name}_{k}.avi")
    train = index_dataset("hmdb51", tmp_path, "train")
    test = index_dataset("hmdb51", tmp_path, "test")
    assert train.classes == ["brush_hair", "wave"]
    assert [(i.class_name, i.path.rsplit("/", 1)[1]) for i in train.items] == [
        ("brush_hair", "brush_hair_0.avi"), ("wave", "wave_1.avi"), ("wave", "wave_2.avi")]
    assert [i.label for i in test.items] == [0, 1]
    with pytest.raises(DatasetError, match="_test_split2.txt"):
        index_dataset("hmdb51", tmp_path, "train2")
    with pytest.raises(DatasetError, match="hmdb51: unknown split 'val'"):
        index_dataset("hmdb51", tmp_path, "val")


def test_malformed_split_file_lines_name_the_file_and_line(tmp_path, sample_root):
    splits = tmp_path / "hmdb" / "splits"
    splits.mkdir(parents=True)
    bad = splits / "wave_test_split1.txt"
    bad.write_text("wave_0.avi 1\nwave_1.avi\n")  # the second line lost its flag
    _touch(tmp_path / "hmdb" / "wave" / "wave_0.avi")
    with pytest.raises(DatasetError, match=r"wave_test_split1.txt: line 'wave_1.avi' is not "
                                           r"'<video> <0\|1\|2>'") as info:
        index_dataset("hmdb51", tmp_path / "hmdb", "train")
    assert str(bad) in str(info.value)
    root = tmp_path / "ucf"
    shutil.copytree(sample_root / "ucfTrainTestlist", root / "ucfTrainTestlist")
    (root / "ucfTrainTestlist" / "classInd.txt").write_text("1 Jump\r\n2\r\n")
    with pytest.raises(DatasetError, match=r"classInd.txt: line '2' is not '<id> <class>'"):
        index_dataset("ucf101", root, "train")


def test_folder_with_and_without_split_dirs(tmp_path):
    for split in ("train", "test"):
        for cls in ("b_walk", "a_run"):
            _touch(tmp_path / "split" / split / cls / f"{cls}_1.mp4")
    _touch(tmp_path / "split" / "train" / "a_run" / "notes.txt")       # not a video: ignored
    index = index_dataset("folder", tmp_path / "split", "train")
    assert index.classes == ["a_run", "b_walk"] and [i.label for i in index.items] == [0, 1]
    with pytest.raises(DatasetError, match="no 'val' folder"):
        index_dataset("folder", tmp_path / "split", "val")
    _touch(tmp_path / "flat" / "cats" / "x.webm")
    assert len(index_dataset("folder", tmp_path / "flat", "all").items) == 1
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    with pytest.warns(DataWarning, match="cats: class folder 0 holds no video files"), \
            pytest.raises(DatasetError, match="has no videos"):
        index_dataset("folder", tmp_path / "empty", "all")


def test_csv_and_jsonl_manifests(tmp_path):
    for name in ("a.mp4", "sub/b.mp4", "c.mp4"):
        _touch(tmp_path / "videos" / name)
    (tmp_path / "m.csv").write_text("path,label,split\nvideos/a.mp4,dog,train\n"
                                    "videos/sub/b.mp4,cat,train\nvideos/c.mp4,dog,test\n")
    index = index_dataset("csv", tmp_path / "m.csv", "train")
    assert index.classes == ["cat", "dog"] and [i.label for i in index.items] == [1, 0]
    assert index.items[1].path == str(tmp_path / "videos" / "sub" / "b.mp4")
    rows = [{"path": "videos/a.mp4", "label": 2}, {"path": "videos/c.mp4", "label": 0}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    index = index_dataset("jsonl", tmp_path / "m.jsonl", "train")
    assert [i.label for i in index.items] == [2, 0] and index.classes == ["0", "1", "2"]
    (tmp_path / "bad.csv").write_text("path,label\nvideos/missing.mp4,dog\n")
    with pytest.raises(DatasetError, match=r"bad.csv: names videos/missing.mp4"):
        index_dataset("csv", tmp_path / "bad.csv", "train")


@pytest.mark.parametrize("label, message", [("-1", "label '-1' is negative"),
                                            ("4000000000", "label 4000000000 is not a class id")])
def test_hostile_numeric_labels_are_refused(tmp_path, label, message):
    _touch(tmp_path / "videos" / "a.mp4")
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "videos/a.mp4", "label": 0}) + "\n" +
                                      json.dumps({"path": "videos/a.mp4", "label": label}) + "\n")
    with pytest.raises(DatasetError, match=f"m.jsonl: {message}"):
        index_dataset("jsonl", tmp_path / "m.jsonl", "train")


def test_clear_errors_for_bad_roots(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        index_dataset("ucf101", tmp_path / "nope", "train")
    with pytest.raises(DatasetError, match="no ucfTrainTestlist"):
        index_dataset("ucf101", tmp_path, "train")
    with pytest.raises(DatasetError, match="unknown dataset 'kinetics'"):
        index_dataset("kinetics", tmp_path, "train")


def test_item_key_is_stable_and_dot_free():
    item = VideoItem("/data/My Video.v2 (1).mp4", 0, "x")
    assert item_key(7, item) == "000007_My_Video_v2_1"
    assert item_key(7, VideoItem("/d/..mp4", 0, "x")) == "000007_video"
