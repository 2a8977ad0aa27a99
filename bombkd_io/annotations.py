"""The annotation files of ssv2, kinetics and diving48, read into ``(classes, entries)``.

Each parser takes the dataset root and one split's annotation file and returns the classes (id
-> name) and an ``Entry`` per listed video: where it is listed (file and entry or line, for
errors), its path under the root, and its class id (``None`` in a split without labels).
``bombkd_io.datasets`` turns these into a ``VideoIndex``.

The files are read as hostile: an id or label becomes part of a path only once it matches a
grammar (``VIDEO_ID``, ``CLASS_FOLDER``: never a separator, ``..`` or an absolute path), class ids
are range-checked, and every error is a ``DatasetError`` naming the file and the entry or line.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import NamedTuple

from bombkd_io.errors import DatasetError

# (grammar, what it allows): what an id or label read from a file must match to become a path part
VIDEO_ID = (re.compile(r"[A-Za-z0-9_-]{1,64}"), "1-64 letters, digits, '_' or '-'")
CLASS_FOLDER = (re.compile(r"[^\x00-\x1f/\\:]{1,100}"),
                "1-100 characters, no '/', '\\', ':' or control characters, not dots only")
_DECIMAL = re.compile(r"[0-9]{1,9}")
_REDOWNLOAD = "the annotation files are damaged or not the official ones: re-download them"


class Entry(NamedTuple):
    where: str          # "FILE: entry N" / "FILE: line N"
    video: str          # path under the root, of checked parts
    label: int | None   # class id; None: the split has no labels


def ssv2(root: Path, source: Path) -> tuple[list[str], list[Entry]]:
    """Classes in labels.json id order; a video's class is its template without brackets.
    ``test.json`` lists ids only."""
    labels_file = root / "labels" / "labels.json"
    ids = _json(labels_file, dict)
    classes: list = [None] * len(ids)
    for name, value in ids.items():
        where = f"{labels_file}: class {name[:80]!r}"
        label = _class_id(value, len(ids), where)
        if classes[label] is not None:
            raise DatasetError(f"{where}: id {label} is also {classes[label]!r}; {_REDOWNLOAD}")
        classes[label] = name
    position = {name: i for i, name in enumerate(classes)}
    labelled = source.name != "test.json"
    entries = []
    for n, e in enumerate(_json(source, list, ("id", "template") if labelled else ("id",)), 1):
        where = f"{source}: entry {n}"
        vid = _part(str(e["id"]) if type(e["id"]) is int else e["id"], VIDEO_ID, "id", where)
        label = None
        if labelled:
            name = str(e["template"]).replace("[", "").replace("]", "")
            if name not in position:
                raise DatasetError(f"{where}: template {name[:80]!r} is not a class of "
                                   f"{labels_file}; {_REDOWNLOAD}")
            label = position[name]
        entries.append(Entry(where, f"20bn-something-something-v2/{vid}.webm", label))
    return classes, entries


def kinetics(root: Path, source: Path) -> tuple[list[str], list[Entry]]:
    """Classes are the sorted labels of train.csv (of ``source`` when there is no train.csv); a
    file with no label column is a split without labels, its videos in ``root/{split}/``."""
    rows = _kinetics_rows(source)
    train = root / "annotations" / "train.csv"
    named = rows if source == train or not train.is_file() else _kinetics_rows(train)
    classes = sorted({label for _, label, _ in named if label is not None})
    ids = {name: i for i, name in enumerate(classes)}
    entries = []
    for where, label, video in rows:
        if label is None:
            entries.append(Entry(where, f"{source.stem}/{video}", None))
        elif label not in ids:
            raise DatasetError(f"{where}: label {label!r} is not a class of {train}; "
                               f"{_REDOWNLOAD}")
        else:
            entries.append(Entry(where, f"{source.stem}/{label}/{video}", ids[label]))
    return classes, entries


def diving48(root: Path, source: Path) -> tuple[list[str], list[Entry]]:
    """Classes in vocabulary order, each named by its words (takeoff, somersaults, twists,
    flight position) joined by spaces. The clips are already cut to start_frame-end_frame."""
    vocab_file = root / "Diving48_vocab.json"
    classes = []
    for n, words in enumerate(_json(vocab_file, list), start=1):
        words = [words] if isinstance(words, str) else words
        if not isinstance(words, list) or not words or not all(isinstance(w, str) for w in words):
            raise DatasetError(f"{vocab_file}: entry {n} is not a list of words; {_REDOWNLOAD}")
        classes.append(" ".join(words))
    entries = []
    for n, e in enumerate(_json(source, list, ("vid_name", "label")), start=1):
        where = f"{source}: entry {n}"
        vid = _part(e["vid_name"], VIDEO_ID, "vid_name", where)
        entries.append(Entry(where, f"rgb/{vid}.mp4", _class_id(e["label"], len(classes), where)))
    return classes, entries


def _part(value, grammar: tuple[re.Pattern, str], what: str, where: str) -> str:
    """``value`` if it may become one part of a path: it matches ``grammar``, is not made of dots
    only and has no spaces at either end."""
    pattern, allowed = grammar
    if isinstance(value, str) and pattern.fullmatch(value) and value.strip(".") \
            and value == value.strip():
        return value
    raise DatasetError(f"{where}: {what} {str(value)[:80]!r} cannot name a file ({allowed}); "
                       f"{_REDOWNLOAD}")


def _class_id(value, count: int, where: str) -> int:
    """A class id (an int, or a decimal string) in ``[0, count)``."""
    if isinstance(value, str) and _DECIMAL.fullmatch(value):
        value = int(value)
    if type(value) is not int or not 0 <= value < count:
        raise DatasetError(f"{where}: class id {str(value)[:20]!r} is not in [0, {count}); "
                           f"{_REDOWNLOAD}")
    return value


def _json(path: Path, kind: type, keys: tuple[str, ...] = ()) -> list | dict:
    """The JSON document in ``path``, a ``kind``; with ``keys``, a list of dicts that hold them."""
    text = _read(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: not valid JSON ({err}); {_REDOWNLOAD}") from err
    if not isinstance(data, kind):
        raise DatasetError(f"{path}: holds a JSON {type(data).__name__}, not a {kind.__name__}; "
                           f"{_REDOWNLOAD}")
    for n, entry in enumerate(data if keys else (), start=1):
        if not isinstance(entry, dict) or not all(k in entry for k in keys):
            raise DatasetError(f"{path}: entry {n} needs {', '.join(keys)} (got "
                               f"{str(entry)[:80]}); {_REDOWNLOAD}")
    return data


def _kinetics_rows(path: Path) -> list[tuple[str, str | None, str]]:
    """``(where, label or None, video file name)`` of each row of a Kinetics csv."""
    reader = csv.DictReader(_read(path).splitlines())
    rows = []
    try:
        for row in reader:
            where = f"{path}: line {reader.line_num}"
            if not all(row.get(k) for k in ("youtube_id", "time_start", "time_end")):
                raise DatasetError(f"{where}: needs youtube_id, time_start and time_end (got "
                                   f"{str(row)[:80]}); {_REDOWNLOAD}")
            label = None
            if "label" in reader.fieldnames:
                label = _part(row["label"], CLASS_FOLDER, "label", where)
            vid = _part(row["youtube_id"], VIDEO_ID, "youtube_id", where)
            start, end = (_seconds(row[k], k, where) for k in ("time_start", "time_end"))
            rows.append((where, label, f"{vid}_{start:06d}_{end:06d}.mp4"))
    except csv.Error as err:  # raised before the reader counts the line
        raise DatasetError(f"{path}: line {reader.line_num + 1}: not CSV ({err}); "
                           f"{_REDOWNLOAD}") from err
    return rows


def _seconds(text: str, what: str, where: str) -> int:
    if not _DECIMAL.fullmatch(text):
        raise DatasetError(f"{where}: {what} {text[:20]!r} is not whole seconds; {_REDOWNLOAD}")
    return int(text)


def _read(path: Path) -> str:
    if not path.is_file():
        raise DatasetError(f"{path}: missing annotation file; pass the dataset root that holds it")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not UTF-8 text ({err}); {_REDOWNLOAD}") from err
