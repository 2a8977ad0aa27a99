"""Datasets read from annotation files (ssv2, kinetics, diving48): the official layouts, written
here with real videos; splits without labels; missing videos; crafted hostile annotation files."""
from __future__ import annotations

import json
import shutil
import warnings

import pytest
from typer.testing import CliRunner

from bombkd_io.datasets import UNLABELLED, index_dataset
from bombkd_io.errors import DataWarning, DatasetError
from bombkd_io.loaders.cached import make_cached_loader
from bombkd_io.loaders.clips import VideoClipLoader
from bombkd_io.video import probe_index
from bombkd_train.cli.main import app

SSV2_CLASSES = {"Pushing something from left to right": "0",
                "Holding something next to something": "1"}
KINETICS_HEADER = "label,youtube_id,time_start,time_end,split\n"
VOCAB = [["Back", "15som", "05Twis", "FREE"], ["Inward", "25som", "NoTwis", "PIKE"]]


def _write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _json(path, data):
    _write(path, json.dumps(data))


@pytest.fixture
def ssv2(tmp_path, codec_videos):
    root = tmp_path / "ssv2"
    _json(root / "labels" / "labels.json", SSV2_CLASSES)
    _json(root / "labels" / "train.json", [
        {"id": "101", "label": "holding a cup next to a pen", "placeholders": ["a cup", "a pen"],
         "template": "Holding [something] next to [something]"},
        {"id": "102", "label": "pushing a box from left to right", "placeholders": ["a box"],
         "template": "Pushing [something] from left to right"}])
    _json(root / "labels" / "validation.json", [
        {"id": "201", "label": "pushing a pen", "placeholders": ["a pen"],
         "template": "Pushing [something] from left to right"}])
    _json(root / "labels" / "test.json", [{"id": "301"}])
    for vid in ("101", "102", "201", "301"):
        shutil.copy(codec_videos["vp9"], _mkdir(root / "20bn-something-something-v2") /
                    f"{vid}.webm")
    return root


@pytest.fixture
def kinetics(tmp_path, codec_videos):
    root = tmp_path / "k400"
    rows = {"train": ["playing cards,aaaaaaaaaaa,14,24,train", "abseiling,bbbbbbbbbbb,0,10,train",
                      "abseiling,gone-gone-1,5,15,train"],       # taken off YouTube: no file
            "validate": ["playing cards,ccccccccccc,100,110,validate"]}
    for split, lines in rows.items():
        _write(root / "annotations" / f"{split}.csv", KINETICS_HEADER + "\n".join(lines) + "\n")
    _write(root / "annotations" / "test.csv", "youtube_id,time_start,time_end,split\n"
                                               "ddddddddddd,3,13,test\n")   # 600/700: no labels
    for rel in ("train/playing cards/aaaaaaaaaaa_000014_000024.mp4",
                "train/abseiling/bbbbbbbbbbb_000000_000010.mp4",
                "validate/playing cards/ccccccccccc_000100_000110.mp4",
                "test/ddddddddddd_000003_000013.mp4"):
        shutil.copy(codec_videos["h264"], _mkdir((root / rel).parent) / (root / rel).name)
    return root


@pytest.fixture
def diving48(tmp_path, codec_videos):
    root = tmp_path / "diving48"
    _json(root / "Diving48_vocab.json", VOCAB)
    splits = {"train": ["-mmq0PT-u8k_00155", "zzz_00001"], "test": ["abc_00007"]}
    for split, names in splits.items():
        _json(root / f"Diving48_V2_{split}.json",
              [{"vid_name": n, "label": k % 2, "start_frame": 0, "end_frame": 23}
               for k, n in enumerate(names)])
        for n in names:
            shutil.copy(codec_videos["h264"], _mkdir(root / "rgb") / f"{n}.mp4")
    return root


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def _videos(index) -> list[tuple[str, int, str]]:
    """(path under the root, label, class name) of each item."""
    return [(item.path[len(index.root) + 1:], item.label, item.class_name) for item in index.items]


def test_ssv2_layout(ssv2):
    train = index_dataset("ssv2", ssv2, "train")
    assert train.classes == list(SSV2_CLASSES)  # by labels.json id
    assert _videos(train) == [
        ("20bn-something-something-v2/101.webm", 1, "Holding something next to something"),
        ("20bn-something-something-v2/102.webm", 0, "Pushing something from left to right")]
    assert train.labelled and not train.missing
    assert [i.label for i in index_dataset("ssv2", ssv2, "validation").items] == [0]
    test = index_dataset("ssv2", ssv2, "test")  # featurize takes it
    assert not test.labelled and [(i.label, i.class_name) for i in test.items] == [(UNLABELLED, "")]
    with pytest.raises(DatasetError, match=r"test.json: split 'test' of ssv2 has no labels, so it "
                                           r"can be featurized but not trained"):
        index_dataset("ssv2", ssv2, "test", require_labels=True)
    with pytest.raises(DatasetError, match="has no labels"):  # the video-mode loader trains
        VideoClipLoader("ssv2", ssv2, "test")
    with pytest.raises(DatasetError, match="ssv2: unknown split 'val'; use one of train, "
                                           "validation, test"):
        index_dataset("ssv2", ssv2, "val")
    (ssv2 / "20bn-something-something-v2" / "101.webm").unlink()  # not kinetics: an error
    with pytest.raises(DatasetError, match=r"train.json: entry 1: names .*101.webm, but"):
        index_dataset("ssv2", ssv2, "train")


def test_kinetics_layout_and_missing_videos(kinetics):
    with pytest.warns(DataWarning, match=r"train.csv: 1 of the 3 videos it lists are missing "
                                         r"\(first: .*gone-gone-1_000005_000015.mp4\)"):
        train = index_dataset("kinetics400", kinetics, "train")
    assert train.classes == ["abseiling", "playing cards"]  # sorted labels of train.csv
    assert _videos(train) == [
        ("train/playing cards/aaaaaaaaaaa_000014_000024.mp4", 1, "playing cards"),
        ("train/abseiling/bbbbbbbbbbb_000000_000010.mp4", 0, "abseiling"),
        ("train/abseiling/gone-gone-1_000005_000015.mp4", 0, "abseiling")]
    assert train.missing == [train.items[2].path]
    # what featurize does: the probe leaves the missing video out, to the manifest's failed list
    ok, _, failed = probe_index(train, range(3))
    assert ok == [0, 1] and [p for p, _ in failed] == train.missing
    for name in ("kinetics600", "kinetics700"):
        val = index_dataset(name, kinetics, "val")  # val is validate
        assert val.dataset == name and _videos(val) == _videos(
            index_dataset(name, kinetics, "validate"))
        assert val.classes == train.classes and [i.label for i in val.items] == [1]
    test = index_dataset("kinetics700", kinetics, "test")
    assert _videos(test) == [("test/ddddddddddd_000003_000013.mp4", UNLABELLED, "")]
    with pytest.raises(DatasetError, match="test.csv: split 'test' of kinetics700 has no labels"):
        index_dataset("kinetics700", kinetics, "test", require_labels=True)
    shutil.rmtree(kinetics / "train")
    with warnings.catch_warnings(), pytest.raises(
            DatasetError, match=r"train.csv: none of the 3 videos it lists exist .*check --root"):
        warnings.simplefilter("error")
        index_dataset("kinetics400", kinetics, "train")


def test_diving48_layout(diving48):
    train = index_dataset("diving48", diving48, "train")
    assert train.classes == ["Back 15som 05Twis FREE", "Inward 25som NoTwis PIKE"]  # vocab order
    assert _videos(train) == [("rgb/-mmq0PT-u8k_00155.mp4", 0, "Back 15som 05Twis FREE"),
                              ("rgb/zzz_00001.mp4", 1, "Inward 25som NoTwis PIKE")]
    assert _videos(index_dataset("diving48", diving48, "test")) == [
        ("rgb/abc_00007.mp4", 0, "Back 15som 05Twis FREE")]
    with pytest.raises(DatasetError, match="diving48: unknown split 'validation'"):
        index_dataset("diving48", diving48, "validation")


def test_help_lists_the_datasets():
    for command in ("featurize", "train"):
        result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "300"})
        assert result.exit_code == 0
        assert all(name in result.output for name in ("ssv2", "kinetics700", "diving48"))


# --- hostile annotation files: each entry below is one crafted file --------------------------

SSV2_TRAIN = "labels/train.json"
HOSTILE_SSV2 = [  # (file, content, error)
    (SSV2_TRAIN, [{"id": "../../etc/passwd", "template": "Pushing [something] from left to right"}],
     r"train.json: entry 1: id '../../etc/passwd' cannot name a file \(1-64 letters"),
    (SSV2_TRAIN, [{"id": "101", "template": "Pushing [something] from left to right"},
                  {"id": "/abs", "template": "Pushing [something] from left to right"}],
     r"train.json: entry 2: id '/abs' cannot name a file"),
    (SSV2_TRAIN, [{"id": "101", "template": "Eating [something]"}],
     r"train.json: entry 1: template 'Eating something' is not a class of .*labels.json"),
    (SSV2_TRAIN, [{"id": "101"}], r"train.json: entry 1 needs id, template"),
    (SSV2_TRAIN, {"id": "101"}, r"train.json: holds a JSON dict, not a list"),
    (SSV2_TRAIN, "[{", r"train.json: not valid JSON"),
    ("labels/labels.json", {"Pushing something from left to right": "0",
                            "Holding something next to something": "174"},
     r"labels.json: class 'Holding something next to something': class id '174' is not in "
     r"\[0, 2\)"),
    ("labels/labels.json", {"Pushing something from left to right": "0",
                            "Holding something next to something": 0},
     r"labels.json: class 'Holding something next to something': id 0 is also 'Pushing"),
    ("labels/labels.json", {"Pushing something from left to right": "-1",
                            "Holding something next to something": "1"},
     r"class id '-1' is not in \[0, 2\)"),
]


@pytest.mark.parametrize("rel, content, error", HOSTILE_SSV2)
def test_hostile_ssv2_annotations(ssv2, rel, content, error):
    _write(ssv2 / rel, content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DatasetError, match=error) as info:
        index_dataset("ssv2", ssv2, "train")
    assert str(ssv2 / rel) in str(info.value) and "re-download" in str(info.value)


HOSTILE_KINETICS = [  # train.csv lines after the header
    ("abseiling,../../../etc/x,0,10,train", r"line 2: youtube_id '../../../etc/x' cannot name"),
    ("../../etc,bbbbbbbbbbb,0,10,train", r"line 2: label '../../etc' cannot name a file"),
    ("..,bbbbbbbbbbb,0,10,train", r"line 2: label '..' cannot name a file"),
    ("...,bbbbbbbbbbb,0,10,train", r"line 2: label '...' cannot name a file"),
    (" abseiling,bbbbbbbbbbb,0,10,train", r"line 2: label ' abseiling' cannot name a file"),
    ("/etc,bbbbbbbbbbb,0,10,train", r"line 2: label '/etc' cannot name"),
    ("C:\\x,bbbbbbbbbbb,0,10,train", r"line 2: label 'C:\\\\x' cannot name"),
    ("abseiling,bbbbbbbbbbb,-5,10,train", r"line 2: time_start '-5' is not whole seconds"),
    ("abseiling,bbbbbbbbbbb,0,1e99,train", r"line 2: time_end '1e99' is not whole seconds"),
    ("abseiling,bbbbbbbbbbb,0,10,train\nabseiling", r"line 3: needs youtube_id, time_start and"),
    ("abseiling,bb\0b,0,10,train", r"line 2: youtube_id 'bb\\x00b' cannot name a file"),
    ("x" * 200_000 + ",bbbbbbbbbbb,0,10,train", r"train.csv: line 2: not CSV \(field larger"),
]


@pytest.mark.parametrize("line, error", HOSTILE_KINETICS)
def test_hostile_kinetics_annotations(kinetics, line, error):
    bad = kinetics / "annotations" / "train.csv"
    _write(bad, KINETICS_HEADER + line + "\n")
    with pytest.raises(DatasetError, match=error) as info:
        index_dataset("kinetics400", kinetics, "train")
    assert str(bad) in str(info.value) and "re-download" in str(info.value)


def test_kinetics_label_not_in_train_csv(kinetics):
    _write(kinetics / "annotations" / "validate.csv",
           KINETICS_HEADER + "juggling,eeeeeeeeeee,0,10,validate\n")
    with pytest.raises(DatasetError, match=r"validate.csv: line 2: label 'juggling' is not a class "
                                           r"of .*train.csv"):
        index_dataset("kinetics400", kinetics, "validate")


HOSTILE_DIVING48 = [  # (file, content, error)
    ("Diving48_V2_train.json", [{"vid_name": "..\\..\\x", "label": 0}],
     r"train.json: entry 1: vid_name '..\\\\..\\\\x' cannot name a file"),
    ("Diving48_V2_train.json", [{"vid_name": "a_1", "label": 0}, {"vid_name": "..", "label": 0}],
     r"train.json: entry 2: vid_name '..' cannot name"),
    ("Diving48_V2_train.json", [{"vid_name": "a_1", "label": 48}],
     r"train.json: entry 1: class id '48' is not in \[0, 2\)"),
    ("Diving48_V2_train.json", [{"vid_name": "a_1", "label": True}],
     r"train.json: entry 1: class id 'True' is not in \[0, 2\)"),
    ("Diving48_V2_train.json", [{"vid_name": "a_1", "label": -1}], r"class id '-1' is not in"),
    ("Diving48_V2_train.json", [{"vid_name": "a_1"}], r"train.json: entry 1 needs vid_name, label"),
    ("Diving48_vocab.json", [["Back", "15som"], {"x": 1}],
     r"vocab.json: entry 2 is not a list of words"),
    ("Diving48_vocab.json", "\udcff", r"vocab.json: not (UTF-8 text|valid JSON)"),
]


@pytest.mark.parametrize("rel, content, error", HOSTILE_DIVING48)
def test_hostile_diving48_annotations(diving48, rel, content, error):
    path = diving48 / rel
    if content == "\udcff":
        path.write_bytes(b"[\xff]")
    else:
        _json(path, content)
    with pytest.raises(DatasetError, match=error) as info:
        index_dataset("diving48", diving48, "train")
    assert str(path) in str(info.value) and "re-download" in str(info.value)


@pytest.mark.slow
def test_featurize_records_missing_kinetics_videos_and_takes_ssv2_test(kinetics, ssv2, tmp_path):
    from bombkd_train.featurize import featurize
    from bombkd_train.config import FeaturizeConfig

    def run(dataset, root, split):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)
            return featurize(FeaturizeConfig(dataset=dataset, root=str(root), split=split,
                                             student="tiny-vjepa2", out=str(tmp_path / dataset),
                                             batch_size=2, decode_threads=1))

    manifest = run("kinetics400", kinetics, "train")
    assert manifest.count == 2 and [f["path"] for f in manifest.failed] == [
        str(kinetics / "train" / "abseiling" / "gone-gone-1_000005_000015.mp4")]
    assert manifest.labels
    # a split without labels is featurized, and its cache refused for training
    unlabelled = run("ssv2", ssv2, "test")
    assert unlabelled.count == 1 and not unlabelled.labels
    with pytest.raises(DatasetError, match="split 'test' has no labels in this cache, so it can "
                                           "be featurized but not trained or evaluated on"):
        make_cached_loader(tmp_path / "ssv2", "test")
