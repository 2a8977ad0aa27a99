"""Convert a TC-BombKD feature cache (``polyspace.data.featurize``) into a format-1 cache.

Accepted input (``SRC``), the layouts TC-BombKD writes plus a pickle-free one:

- an index ``features_{dataset}_{split}.index.json`` (or a directory holding one), a JSON object
  with ``"shards"``: a list of ``{"file": NAME, "start": int, "count": int}`` or of names, each
  relative to the index; optional ``dataset``, ``split``, ``student``, ``teachers``, ``dtype``,
  ``num_frames``, ``classes``. A shard is a ``.pkl`` file or an ``npy_dir`` (below);
- one ``.pkl`` file (``features_{dataset}_{split}.pkl``), or a directory of
  ``features_*_shard_*.pkl`` files without an index (read in name order);
- an ``npy_dir``: a directory of stacked columns ``student.npy`` ``[N, T', D]``,
  ``<teacher>.npy`` ``[N, T', D]``, optional ``labels.npy`` ``[N]`` and ``paths.json``
  (``[N]`` strings); or a directory of per-sample ``*.npz`` files (``z0``/``student`` and
  ``t_<teacher>``/``<teacher>`` arrays, optional ``label``).

A pickle holds a list of records ``{"student": [T', D], "<teacher>": [T', D] or "teachers":
{name: array}, "label": int, "path": str}`` (or one dict of columns). Student features may be
called ``student``/``feats``/``features``/``student_feat``/``x``/``z0``; a ``t_`` prefix on a
teacher name is dropped; label -1 or none means unlabelled.

The source may be a stranger's. Pickles run code when loaded, so a file is read as a pickle only
with ``trust_pickle=True``, whatever its name: what a file is is decided by its first bytes
(``\x93NUMPY``: npy, ``PK\x03\x04``: npz, anything else: pickle). ``.npy``/``.npz`` load with
``allow_pickle=False`` after their headers are checked (no object arrays; a shape must fit in
the bytes the file holds). Names in an index are plain file names beside it; the dataset and
split must be valid names (``bombkd_io.names``); nothing is written outside ``out``, and
nothing there is overwritten.
"""
from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bombkd_io.atomic import folder_problem
from bombkd_io.datasets import VideoItem, item_key
from bombkd_io.errors import ConfigError, DatasetError, FormatError
from bombkd_io.names import check_name, name_problem, role_name
from bombkd_io.sampling import DEFAULT_SHARD_SIZE
from bombkd_io.shards.codec import DTYPES
from bombkd_io.shards.manifest import Manifest, ModelEntry, manifest_path, save_manifest
from bombkd_io.shards.writer import ShardSetWriter

STUDENT_KEYS = ("student", "feats", "features", "student_feat", "x", "z0")
TEACHER_DICT_KEYS = ("teachers", "teacher_feats")
LABEL_KEYS = ("label", "labels", "y", "cls")
PATH_KEYS = ("path", "video", "video_path", "paths")
META_KEYS = ("meta_json", "meta", "metadata", "index", "idx")
TC_NAME_RE = re.compile(  # features_{dataset}_{split}[_shard_NNNNN](.index.json|.pkl)
    r"^features_(?P<dataset>.+)_(?P<split>[^_]+?)(?:_shard_\d+)?(?:\.index\.json|\.pkl)$")
PICKLE_HELP = ("pickle files can run arbitrary code when loaded; pass --trust-pickle only for a "
               "cache you made yourself or trust")
TC_FILE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}$")  # a shard named in an index
NPY_MAGIC, ZIP_MAGIC = b"\x93NUMPY", b"PK\x03\x04"


@dataclass
class Record:
    """One TC-BombKD sample, normalised."""
    student: np.ndarray          # [T', D]
    teachers: dict[str, np.ndarray]
    label: int | None
    path: str | None


@dataclass
class Source:
    """What SRC points at: its shard paths (pkl files, npy dirs) and the index, if any."""
    shards: list[Path]
    index: dict
    name_hint: dict  # dataset/split parsed from the file name
    index_path: Path | None = None


def import_tc_cache(src, out, *, split: str | None = None, dataset: str | None = None,
                    trust_pickle: bool = False, shard_size: int = DEFAULT_SHARD_SIZE,
                    dtype: str | None = None) -> Manifest:
    """Convert ``src`` into ``{dataset}-{split}`` format-1 shards under ``out``; its manifest."""
    out = Path(out)
    problems = [f"--{what}: {p}" for value, what in ((dataset, "dataset"), (split, "split"))
                if value is not None and (p := name_problem(value, what))]
    if problem := folder_problem(out, "--out"):
        problems.append(problem)
    if problems:
        raise ConfigError(problems)
    source = find_source(Path(src))
    meta = {**source.name_hint, **{k: v for k, v in source.index.items() if v is not None}}
    if not (dataset or meta.get("dataset")) or not (split or meta.get("split")):
        raise ConfigError(f"{src}: cannot tell the dataset and split; pass --dataset and --split")
    where = source.index_path or src
    dataset = dataset or check_name(meta["dataset"], "dataset", where=where)
    split = split or check_name(meta["split"], "split", where=where)
    if shard_size < 1:
        problems.append(f"--shard-size must be >= 1, got {shard_size}")
    if dtype is not None and dtype not in DTYPES:
        problems.append(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    pickles = [p for p in source.shards if p.is_file() and file_kind(p) == "pickle"]
    if pickles and not trust_pickle:
        problems.append(f"{pickles[0]} is a pickle (by its content, whatever its name); "
                        f"{PICKLE_HELP}")
    existing = sorted(out.glob(f"{dataset}-{split}-*.tar")) if out.is_dir() else []
    if manifest_path(out, dataset, split).exists() or existing:
        found = manifest_path(out, dataset, split) if not existing else existing[0]
        problems.append(f"--out {out}: already holds {found.name} of a {dataset}-{split} "
                        "cache; choose another --out (nothing is overwritten)")
    if problems:
        raise ConfigError(problems)
    return _convert(source, out, dataset, split, shard_size, dtype, meta)


def file_kind(path: Path) -> str:
    """"npy", "npz" or "pickle", by the file's first bytes (never by its name)."""
    with open(path, "rb") as f:
        head = f.read(6)
    return "npy" if head == NPY_MAGIC else "npz" if head[:4] == ZIP_MAGIC else "pickle"


def _convert(source: Source, out: Path, dataset: str, split: str, shard_size: int,
             dtype: str | None, meta: dict) -> Manifest:
    writers: dict[str, ShardSetWriter] = {}
    shapes, labels, paths, count = {}, [], [], 0
    try:
        for where, rec in tqdm(_records(source), desc=f"import {dataset}-{split}", unit="sample"):
            if not writers:
                dtype = dtype or ("float16" if rec.student.dtype == np.float16 else "float32")
                writers = {m: ShardSetWriter(out, dataset, split, m, shard_size, dtype)
                           for m in ["student", *rec.teachers]}
            _check_models(where, rec, writers)
            key = item_key(count, VideoItem(rec.path or "", rec.label or 0, ""))
            extra = {"json": {"path": rec.path or "", "source": where}}
            if rec.label is not None:
                extra["cls"] = rec.label
            writers["student"].write(key, rec.student, extra)
            for name, feats in rec.teachers.items():
                writers[name].write(key, feats)
            shapes.update({"student": rec.student.shape,
                           **{n: f.shape for n, f in rec.teachers.items()}})
            labels.append(rec.label)
            paths.append(rec.path)
            count += 1
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    if count == 0:
        raise DatasetError(f"{source.shards[0] if source.shards else 'source'}: no samples")
    entries = {m: w.close() for m, w in writers.items()}
    return _save(out, dataset, split, shard_size, meta, entries, shapes, labels, paths, dtype)


def _save(out, dataset, split, shard_size, meta, entries, shapes, labels, paths, dtype):
    labelled = all(label is not None for label in labels)
    backbones = {"student": str(meta.get("student") or "unknown")}
    backbones.update({_role(t): str(t) for t in meta.get("teachers") or []})
    models = {m: ModelEntry(m, backbones.get(m, m), shapes[m][1], shapes[m][0],
                            int(meta.get("num_frames") or 0), 0, "unknown", dtype, e)
              for m, e in entries.items()}
    classes = meta.get("classes") or _classes(labels if labelled else [], paths)
    manifest = Manifest(dataset, split, [str(c) for c in classes], shard_size, models,
                        len(labels), [], labelled)
    save_manifest(manifest, out)
    return manifest


def _classes(labels: list, paths: list) -> list[str]:
    """Class names by id: the videos' parent folders when each label has its own one folder
    (UCF101/HMDB51 layout); ``class_<id>`` otherwise."""
    if not labels:
        return []
    folders: dict[int, set[str]] = {}
    for label, path in zip(labels, paths):
        folders.setdefault(label, set()).add(Path(path).parent.name if path else "")
    ids = range(max(labels) + 1)
    names = [next(iter(folders[c])) if len(folders.get(c, ())) == 1 else "" for c in ids]
    if all(names) and len(set(names)) == len(names):
        return names
    return [f"class_{c}" for c in ids]


def _check_models(where: str, rec: Record, writers: dict) -> None:
    if set(rec.teachers) != set(writers) - {"student"}:
        raise FormatError(f"{where}: teachers {sorted(rec.teachers)}, but earlier samples have "
                          f"{sorted(set(writers) - {'student'})}; every sample needs the same "
                          "teachers")


def _role(name) -> str:
    """A TC-BombKD teacher's role: ``names.role_name``, without the ``t_`` TC-BombKD puts before
    a teacher's column name."""
    return role_name(str(name)).removeprefix("t_")


# ---- finding the source ------------------------------------------------------------------------

def find_source(src: Path) -> Source:
    """Resolve SRC (index file, pkl file, directory) into its shards, in sample order."""
    if not src.exists():
        raise DatasetError(f"{src}: no such file or directory")
    hint = _name_hint(src.name)
    if src.is_file() and src.name.endswith(".index.json"):
        return _from_index(src)
    if src.is_file():  # a single shard file: a pickle, whatever its name (read by content)
        return Source([src], {}, hint)
    indexes = sorted(src.glob("features_*.index.json"))
    if len(indexes) == 1:
        return _from_index(indexes[0])
    if len(indexes) > 1:
        raise DatasetError(f"{src}: several indexes {[p.name for p in indexes]}; pass one of "
                           "them as SRC")
    shards = sorted(src.glob("features_*_shard_*.pkl"))
    if shards:
        return Source(shards, {}, _name_hint(shards[0].name))
    singles = sorted(src.glob("features_*.pkl"))
    if len(singles) == 1:
        return Source(singles, {}, _name_hint(singles[0].name))
    if (src / "student.npy").is_file() or any(src.glob("*.npz")):
        return Source([src], {}, {})
    raise DatasetError(f"{src}: no TC-BombKD index, pkl shards, single pkl or npy_dir found "
                       f"(holds {sorted(p.name for p in src.iterdir())[:10]})")


def _name_hint(name: str) -> dict:
    m = TC_NAME_RE.match(name)
    return {"dataset": m["dataset"], "split": m["split"]} if m else {}


def _from_index(path: Path) -> Source:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        entries = index["shards"]
        if not isinstance(entries, list) or not entries:
            raise ValueError("'shards' must be a non-empty list")
        names = [e if isinstance(e, str) else e.get("file") or e.get("path") or e["shard"]
                 for e in entries]
        if all(isinstance(e, dict) and "start" in e for e in entries):
            names = [n for _, n in sorted(zip((int(e["start"]) for e in entries), names))]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise FormatError(f"{path}: not a TC-BombKD index ({type(exc).__name__}: {exc}); "
                          "expected {\"shards\": [{\"file\": ..., \"start\": ...}, ...]}") from exc
    bad = next((n for n in names if not isinstance(n, str) or not TC_FILE_RE.match(n)), None)
    if bad is not None:
        raise FormatError(f"{path}: lists shard {bad!r}; an index may only name files beside "
                          "it (letters, digits, '_', '-', '.'; no paths); refusing to read it")
    shards = [path.parent / n for n in names]
    missing = [str(s) for s in shards if not s.exists()]
    if missing:
        raise DatasetError(f"{path}: lists shards that do not exist: {missing[:5]}")
    meta = {k: index.get(k) for k in ("dataset", "split", "student", "teachers", "dtype",
                                      "num_frames", "classes")}
    return Source(shards, meta, _name_hint(path.name), path)


# ---- reading records ---------------------------------------------------------------------------

def _records(source: Source) -> Iterator[tuple[str, Record]]:
    """Yields (where, record) over every shard in order."""
    for shard in source.shards:
        raw = _load_shard(shard)
        for i, item in enumerate(raw):
            where = f"{shard} record {i}"
            yield where, _normalise(item, where, source.index.get("teachers") or [])


def _load_shard(shard: Path) -> list[dict]:
    if shard.is_dir():
        return _load_npy_dir(shard)
    kind = file_kind(shard)
    if kind != "pickle":
        raise FormatError(f"{shard}: a .{kind} file where a pickle shard is expected; put the "
                          "arrays in an npy_dir (see `bombkd import-cache --help`)")
    try:
        with open(shard, "rb") as f:
            data = pickle.load(f)  # only reached with trust_pickle (checked before any I/O)
    except Exception as exc:  # unpickling can raise anything; report which file
        raise FormatError(f"{shard}: cannot unpickle ({type(exc).__name__}: {exc})") from exc
    if isinstance(data, dict):
        data = _columns_to_records(data, shard)
    if not isinstance(data, list):
        raise FormatError(f"{shard}: expected a list of records, got {type(data).__name__}")
    return data


def _columns_to_records(columns: dict, where) -> list[dict]:
    """A dict of equal-length columns -> list of records (teachers dict: one column per name)."""
    flat = {k: v for k, v in columns.items() if k not in TEACHER_DICT_KEYS}
    for key in TEACHER_DICT_KEYS:
        flat.update(columns.get(key) or {})
    lengths = {k: len(v) for k, v in flat.items()
               if hasattr(v, "__len__") and not isinstance(v, str)}
    n = next(iter(lengths.values()), 0)
    if any(length != n for length in lengths.values()):
        raise FormatError(f"{where}: columns of different lengths {lengths}")
    return [{k: flat[k][i] for k in lengths} for i in range(n)]


def _load_npy_dir(folder: Path) -> list[dict]:
    npz = sorted(folder.glob("*.npz"))
    if npz:
        records = []
        for f in npz:
            rec = {k: v for k, v in load_arrays(f).items() if k not in META_KEYS}
            rec.setdefault("path", f.stem)
            records.append(rec)
        return records
    columns = {f.stem: load_arrays(f)[f.stem] for f in sorted(folder.glob("*.npy"))}
    if (folder / "paths.json").is_file():
        columns["path"] = json.loads((folder / "paths.json").read_text(encoding="utf-8"))
    return _columns_to_records(columns, folder)


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npy`` (under its stem) or ``.npz`` file, by content, with every
    header checked before anything is allocated; FormatError naming the file otherwise."""
    kind = file_kind(path)
    try:
        if kind == "npy":
            with open(path, "rb") as f:
                _check_npy_header(f, path.stat().st_size, str(path))
            return {path.stem: np.load(path, allow_pickle=False, mmap_mode="r")}
        if kind == "npz":
            with zipfile.ZipFile(path) as z:
                for info in z.infolist():
                    with z.open(info) as f:
                        _check_npy_header(f, info.file_size, f"{path}:{info.filename}")
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
    except FormatError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise FormatError(f"{path}: not a readable .{kind} file ({type(exc).__name__}: "
                          f"{exc})") from exc
    raise FormatError(f"{path}: not an .npy or .npz file (no numpy or zip signature); if it "
                      "is a pickle, name it in an index or pass it as SRC with --trust-pickle")


def _check_npy_header(f, size: int, where: str) -> None:
    """An npy header: no object dtype, and a shape whose bytes fit in ``size``."""
    version = np.lib.format.read_magic(f)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    shape, _, dtype = read(f)
    if dtype.hasobject:
        raise FormatError(f"{where}: holds Python objects (a pickle inside); only numeric "
                          "arrays are read")
    nbytes = dtype.itemsize * int(np.prod(shape, dtype=object))
    if nbytes > size:
        raise FormatError(f"{where}: declares shape {list(shape)} {dtype} ({nbytes} bytes), "
                          f"but holds {size} bytes: truncated or crafted")


def _normalise(item, where: str, teacher_names: list[str]) -> Record:
    if not isinstance(item, dict):
        raise FormatError(f"{where}: expected a dict record, got {type(item).__name__}")
    skey = next((k for k in STUDENT_KEYS if k in item), None)
    if skey is None:
        raise FormatError(f"{where}: no student features (looked for {list(STUDENT_KEYS)}; "
                          f"record has {sorted(item)})")
    teachers = {}
    for key in TEACHER_DICT_KEYS:
        teachers.update({_role(n): v for n, v in (item.get(key) or {}).items()})
    known = {skey, *TEACHER_DICT_KEYS, *LABEL_KEYS, *PATH_KEYS, *META_KEYS}
    named = {*teacher_names, *(f"t_{t}" for t in teacher_names)}
    for key, value in item.items():  # flat teachers: the index's names, else float arrays
        if key not in known and (key in named if named else _is_features(value)):
            teachers[_role(key)] = value
    label = _label(next((item[k] for k in LABEL_KEYS if k in item), None), where)
    path = next((item[k] for k in PATH_KEYS if k in item), None)
    return Record(_features(item[skey], where, "student"),
                  {n: _features(v, where, n) for n, v in sorted(teachers.items())},
                  None if label is None or label < 0 else label,
                  None if path is None else str(path))


def _label(value, where: str) -> int | None:
    """A record's label as an int (None: unlabelled); FormatError for anything else."""
    if value is None:
        return None
    try:
        label = np.asarray(value).reshape(-1)[0]
        if not (np.issubdtype(label.dtype, np.integer) or
                (np.issubdtype(label.dtype, np.floating) and float(label).is_integer())):
            raise ValueError(f"{label!r} is not an integer")
        label = int(label)
        if label >= 1 << 31:
            raise ValueError(f"{label} is not a class id")
        return label
    except (ValueError, TypeError, IndexError, OverflowError) as exc:
        raise FormatError(f"{where}: label {str(value)[:40]!r} is not a class id ({exc})") from exc


def _is_features(value) -> bool:
    """A float [T', D] or [D] array (numpy, or a torch tensor inside a trusted pickle)."""
    if hasattr(value, "detach"):
        return value.is_floating_point() and value.dim() in (1, 2)
    return (isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating)
            and value.ndim in (1, 2))


def _features(value, where: str, name: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor inside a trusted pickle
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.ndim == 1:
        array = array[None]  # a pooled clip embedding [D] -> [1, D]
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise FormatError(f"{where}: {name} features must be a float [T', D] array, got "
                          f"{array.dtype}{list(array.shape)}")
    return array
