"""Dataset indexers: a root and a split -> ``VideoIndex`` (items in split-file order); and
``match_paths``, which finds recorded video paths (a cache's) among an index's items.

- ``ucf101``: ``root/<Class>/<video>`` +
  ``root/ucfTrainTestlist/{classInd,trainlist0N,testlist0N}.txt``
  (also found as ``root/../ucfTrainTestlist`` or ``root/splits``); ids are classInd.txt order - 1.
- ``hmdb51``: ``root/<class>/<video>`` + ``<class>_test_split<N>.txt`` files (``1`` train,
  ``2`` test, ``0`` unused) in ``root/testTrainMulti_7030_splits`` (or ``root/splits``, ``root``).
- ``folder``: ``root/<split>/<class>/<video>``; ``--split all`` takes ``root/<class>/<video>`` (a
  root with no split folders) whole. A split with no folder is refused (using the whole folder
  would make train and test the same videos); a class folder with no videos warns
  (``DataWarning``: often a ``--root`` one level too high). Ids are sorted class names.
- ``csv`` / ``jsonl``: a manifest file with ``path,label[,split]``; relative paths resolve
  against the manifest's directory; labels may be names or integers.

Datasets read from annotation files (``ANNOTATED``: the split files and the parser of each, in
``bombkd_io.annotations``, which reads them as hostile; one builder makes the index):

- ``ssv2``: ``root/labels/{labels,train,validation,test}.json``, videos
  ``root/20bn-something-something-v2/{id}.webm``; ids are labels.json's, a video's class its
  template without brackets. ``test`` has no labels.
- ``kinetics400`` / ``kinetics600`` / ``kinetics700``:
  ``root/annotations/{train,validate,test}.csv`` (``label,youtube_id,time_start,time_end,split``),
  videos ``root/{split}/{label}/{youtube_id}_{time_start:06d}_{time_end:06d}.mp4`` (a csv with no
  label column: ``root/{split}/{youtube_id}_...mp4``, no labels); ``val`` is ``validate``. Ids
  are the sorted labels of train.csv. Videos taken off YouTube are missing: they stay in the
  index (``VideoIndex.missing``, one ``DataWarning``), so featurize records them as failed, as
  it does any unreadable video.
- ``diving48``: ``root/Diving48_V2_{train,test}.json`` (``vid_name``, ``label``), videos
  ``root/rgb/{vid_name}.mp4``; ids index ``root/Diving48_vocab.json``.

A split without labels (items labelled ``UNLABELLED``) can be featurized but not trained on:
``index_dataset(..., require_labels=True)`` refuses it.
"""
from __future__ import annotations

import csv
import json
import os
import re
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from bombkd_io import annotations
from bombkd_io.errors import DataWarning, DatasetError
from bombkd_io.names import check_name, sanitize

VIDEO_EXTS = (".avi", ".mp4", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv")


@dataclass(frozen=True)
class VideoItem:
    """One video of a split, with its class."""

    path: str          # absolute path
    label: int         # class id, stable
    class_name: str


UNLABELLED = -1   # the label of a video in a split that has none (ssv2 test, kinetics test)
MAX_CLASSES = 100_000   # a numeric label column naming more classes is a broken file


@dataclass
class VideoIndex:
    """A split's videos in split-file order (``index_dataset``), and its class names."""

    dataset: str
    split: str
    root: str
    classes: list[str]          # id -> name
    items: list[VideoItem]      # in split-file order: the "index order" of the cache
    # listed videos that are not on disk, kept in ``items`` (kinetics only; other datasets refuse)
    missing: list[str] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        """Whether every item has a class (a split to train or evaluate on)."""
        return all(item.label != UNLABELLED for item in self.items)


def parse_split(split: str) -> tuple[str, int]:
    """"train" -> ("train", 1); "test3" -> ("test", 3). Other names (folder splits) -> fold 0."""
    match = re.fullmatch(r"(train|test)([123]?)", split)
    if not match:
        return split, 0
    return match.group(1), int(match.group(2) or 1)


def item_key(index: int, item: VideoItem) -> str:
    """A sample key: ``{index:06d}_{stem}``, only ``[A-Za-z0-9_-]`` (no dots: tar member names)."""
    return f"{index:06d}_{sanitize(Path(item.path).stem, 'video')}"


def _find(root: Path, candidates: list[str], what: str) -> Path:
    for rel in candidates:
        if (root / rel).exists():
            return root / rel
    raise DatasetError(f"{root}: no {what} (looked for {', '.join(candidates)}); "
                       "pass the dataset root that holds the official split files")


def _video(root: Path, rel: str, list_file: Path) -> Path:
    path = root / rel
    if not path.is_file():
        raise DatasetError(f"{list_file}: names {rel}, but {path} does not exist; "
                           "check --root or re-download the dataset")
    return path.absolute()


def _official_fold(dataset: str, split: str) -> tuple[str, int]:
    """("train" | "test", fold 1-3) of an official split name; DatasetError for any other."""
    part, fold = parse_split(split)
    if fold == 0:
        raise DatasetError(f"{dataset}: unknown split {split!r}; use train/test, train2/test2, "
                           "train3/test3")
    return part, fold


def _fields(list_file: Path, line: str, count: int, form: str) -> list[str]:
    """The first ``count`` whitespace-separated fields of a split-file line, or a DatasetError
    naming the file and the line."""
    fields = line.split()
    if len(fields) < count:
        raise DatasetError(f"{list_file}: line {line!r} is not '{form}'; fix or re-download the "
                           "split file")
    return fields[:count]


def index_ucf101(root: Path, split: str) -> VideoIndex:
    part, fold = _official_fold("ucf101", split)
    lists = _find(root, ["ucfTrainTestlist", "../ucfTrainTestlist", "splits"], "ucfTrainTestlist")
    class_ind = lists / "classInd.txt"
    classes = [_fields(class_ind, line, 2, "<id> <class>")[1] for line in _lines(class_ind)]
    list_file = lists / f"{part}list0{fold}.txt"
    items = []
    for line in _lines(list_file):
        rel = line.split()[0]
        name = rel.replace("\\", "/").split("/")[0]
        if name not in classes:
            raise DatasetError(f"{list_file}: class {name!r} of {rel} is not in {class_ind}")
        items.append(VideoItem(str(_video(root, rel, list_file)), classes.index(name), name))
    return _checked(VideoIndex("ucf101", split, str(root), classes, items), list_file)


def index_hmdb51(root: Path, split: str) -> VideoIndex:
    part, fold = _official_fold("hmdb51", split)
    lists = _find(root, ["testTrainMulti_7030_splits", "splits", "."], "split directory")
    files = sorted(lists.glob(f"*_test_split{fold}.txt"))
    if not files:
        raise DatasetError(f"{lists}: no *_test_split{fold}.txt files; pass the HMDB51 root")
    classes = [f.name[: -len(f"_test_split{fold}.txt")] for f in files]
    want = "1" if part == "train" else "2"
    items = []
    for label, (name, list_file) in enumerate(zip(classes, files)):
        for line in _lines(list_file):
            video, flag = _fields(list_file, line, 2, "<video> <0|1|2>")
            if flag == want:
                items.append(VideoItem(str(_video(root / name, video, list_file)), label, name))
    return _checked(VideoIndex("hmdb51", split, str(root), classes, items), lists)


SPLIT_DIRS = ("train", "test", "val", "validation")
WHOLE_FOLDER = "all"    # the folder --split that takes every class folder under the root


def index_folder(root: Path, split: str) -> VideoIndex:
    base = _split_folder(root, split)
    class_dirs = sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes = [d.name for d in class_dirs]
    items = []
    for label, folder in enumerate(class_dirs):
        videos = [f for f in sorted(folder.iterdir()) if f.suffix.lower() in VIDEO_EXTS]
        if not videos:
            _warn_empty_class(folder, label)
        items += [VideoItem(str(f.absolute()), label, folder.name) for f in videos]
    return _checked(VideoIndex("folder", split, str(root), classes, items), base)


def _split_folder(root: Path, split: str) -> Path:
    """``root/split``; the root itself only for ``--split all`` on a root with no split folders.

    A missing split folder is refused: taking the whole folder instead would make every split
    the same videos (and evaluate on the training set)."""
    if (root / split).is_dir():
        return root / split
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    splits = [name for name in folders if name in SPLIT_DIRS]
    if splits:
        raise DatasetError(f"{root}: has split folders {splits} but no {split!r} folder; pass "
                           "one of them as --split")
    if split == WHOLE_FOLDER:
        return root
    shown = ", ".join(folders[:8]) + (f", ... ({len(folders)} folders)" if len(folders) > 8
                                      else "")
    raise DatasetError(f"{root}: no {split!r} folder for --split {split} (it holds "
                       f"[{shown or 'no folders'}]); pass --split {WHOLE_FOLDER} to use the whole "
                       f"folder, its subfolders being the classes, or as --root the folder that "
                       f"holds {split}/")


def _warn_empty_class(folder: Path, label: int) -> None:
    """A class folder with no videos keeps its class id (ids stay the sorted folder names), but
    is most often the sign of a wrong --root."""
    nested = any(d.is_dir() for d in folder.iterdir())
    hint = ("it holds folders: is --root one level too high?" if nested
            else "is it a class? check --root")
    warnings.warn(f"{folder}: class folder {label} holds no video files; {hint}", DataWarning,
                  stacklevel=4)


def index_manifest(manifest: Path, split: str, kind: str) -> VideoIndex:
    rows = _manifest_rows(manifest, kind)
    rows = [r for r in rows if not r.get("split") or r["split"] == split]
    labels = [str(r["label"]) for r in rows]
    numeric = all(label.isdecimal() for label in labels)
    if bad := next((label for label in labels if label[1:].isdecimal() and label[0] == "-"), None):
        raise DatasetError(f"{manifest}: label {bad!r} is negative; class ids are 0, 1, ... "
                           "(or give class names)")
    if numeric and labels and max(map(int, labels)) >= MAX_CLASSES:
        raise DatasetError(f"{manifest}: label {max(map(int, labels))} is not a class id "
                           f"(at most {MAX_CLASSES - 1}); fix the label column")
    classes = ([str(i) for i in range(max(map(int, labels)) + 1)] if numeric and labels
               else sorted(set(labels)))
    items = []
    for row, label in zip(rows, labels):
        rel = str(row["path"])
        item_label = int(label) if numeric else classes.index(label)
        items.append(VideoItem(str(_video(manifest.parent, rel, manifest)), item_label,
                               classes[item_label]))
    return _checked(VideoIndex(kind, split, str(manifest), classes, items), manifest)


def _manifest_rows(manifest: Path, kind: str) -> list[dict]:
    if not manifest.is_file():
        raise DatasetError(f"{manifest}: no such manifest; for --dataset {kind} pass the "
                           f"{kind} file as --root")
    if kind == "csv":
        with open(manifest, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        try:
            rows = [json.loads(line) for line in _lines(manifest)]
        except json.JSONDecodeError as err:
            raise DatasetError(f"{manifest}: not valid JSON lines ({err})") from err
    for n, row in enumerate(rows, start=2 if kind == "csv" else 1):
        if not isinstance(row, dict) or not row.get("path") or row.get("label") in (None, ""):
            raise DatasetError(f"{manifest}: row {n} needs 'path' and 'label' (got {row!r})")
    return rows


# --- datasets read from annotation files (bombkd_io.annotations parses them) ------------------


@dataclass(frozen=True)
class Annotated:
    """A dataset read from annotation files: each split's file (under the root) and the parser
    that reads one into ``(classes, entries)``."""
    files: dict[str, str]                                    # split -> annotation file
    parse: Callable[[Path, Path], tuple[list[str], list[annotations.Entry]]]   # (root, file)
    missing_ok: bool = False    # a listed video that is not on disk is recorded, not refused


_KINETICS = Annotated({"train": "annotations/train.csv", "validate": "annotations/validate.csv",
                       "val": "annotations/validate.csv", "test": "annotations/test.csv"},
                      annotations.kinetics, missing_ok=True)   # many YouTube videos are gone
ANNOTATED = {
    "ssv2": Annotated({s: f"labels/{s}.json" for s in ("train", "validation", "test")},
                      annotations.ssv2),
    "kinetics400": _KINETICS, "kinetics600": _KINETICS, "kinetics700": _KINETICS,
    "diving48": Annotated({s: f"Diving48_V2_{s}.json" for s in ("train", "test")},
                          annotations.diving48),
}


def index_annotated(dataset: str, root: Path, split: str, require_labels: bool) -> VideoIndex:
    spec = ANNOTATED[dataset]
    if split not in spec.files:
        raise DatasetError(f"{dataset}: unknown split {split!r}; use one of "
                           f"{', '.join(spec.files)}")
    source = root / spec.files[split]
    classes, entries = spec.parse(root, source)
    if require_labels and any(e.label is None for e in entries):
        raise DatasetError(f"{source}: split {split!r} of {dataset} has no labels, so it can be "
                           "featurized but not trained or evaluated on; pass a labelled --split")
    index = VideoIndex(dataset, split, str(root), classes, [])
    for where, rel, label in entries:
        path = (root / rel).absolute()
        if spec.missing_ok and not path.is_file():
            index.missing.append(str(path))
        else:
            path = _video(root, rel, where)
        index.items.append(VideoItem(str(path), UNLABELLED, "") if label is None
                           else VideoItem(str(path), label, classes[label]))
    if index.missing:
        _report_missing(index, source)
    return _checked(index, source)


def _report_missing(index: VideoIndex, source: Path) -> None:
    """Missing videos (taken off YouTube) stay in the index, so that featurize records them as
    failed like any unreadable video; none on disk at all is a wrong --root."""
    gone, total = len(index.missing), len(index.items)
    if gone == total:
        raise DatasetError(f"{source}: none of the {total} videos it lists exist (first: "
                           f"{index.missing[0]}); check --root")
    warnings.warn(f"{source}: {gone} of the {total} videos it lists are missing (first: "
                  f"{index.missing[0]}); they are left out and recorded as failed", DataWarning,
                  stacklevel=4)


DATASETS = ("ucf101", "hmdb51", "folder", "csv", "jsonl", *ANNOTATED)


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"{path}: missing split file; pass the dataset root that holds it")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _checked(index: VideoIndex, where: Path) -> VideoIndex:
    if not index.items:
        raise DatasetError(f"{where}: split {index.split!r} of {index.dataset} has no videos; "
                           "check --split and --root")
    return index


def index_dataset(dataset: str, root: str | Path, split: str, *,
                  require_labels: bool = False) -> VideoIndex:
    """Index ``split`` of ``dataset`` under ``root`` (a manifest file for csv/jsonl).

    ``require_labels``: refuse a split without labels (ssv2 or kinetics test), as training and
    evaluation do; featurize takes it."""
    if dataset not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    check_name(split, "split")  # it names a folder (folder datasets) and the cache's files
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"{root}: dataset root does not exist; check --root")
    if dataset in ("csv", "jsonl"):
        return index_manifest(root, split, dataset)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory; pass the dataset root as --root")
    if dataset in ANNOTATED:
        return index_annotated(dataset, root.absolute(), split, require_labels)
    indexers = {"ucf101": index_ucf101, "hmdb51": index_hmdb51, "folder": index_folder}
    return indexers[dataset](root.absolute(), split)


def match_paths(index: VideoIndex, paths: Collection[str]) -> tuple[set[int], list[str]]:
    """Index positions of ``paths`` (videos a cache recorded, with the paths of the machine and
    folder it was made in), and the paths that name no video of ``index``.

    A path matches the item whose path relative to the dataset root it ends with (the longest
    such), so a dataset that was moved or mounted elsewhere still matches.
    """
    root = Path(os.path.abspath(index.root))
    base = root.parent if root.is_file() else root  # csv / jsonl: the index file's folder
    by_rel = {}
    for i, item in enumerate(index.items):
        path = Path(os.path.abspath(item.path))
        rel = path.relative_to(base) if path.is_relative_to(base) else path
        by_rel[rel.parts] = i
    found, unmatched = set(), []
    for p in paths:
        parts = Path(p).parts
        hit = next((by_rel[parts[-n:]] for n in range(len(parts), 0, -1)
                    if parts[-n:] in by_rel), None)
        if hit is None:
            unmatched.append(p)
        else:
            found.add(hit)
    return found, unmatched
