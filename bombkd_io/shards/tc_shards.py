"""Read one shard of a TC-BombKD cache (``polyspace.data.featurize``) as normalised records,
treating every byte as hostile; ``import_tc.py`` finds the shards and converts them.

A shard is a pickle file or an npy_dir (a directory), in the layouts ``import_tc.py``'s docstring
and FORMAT.md list; ``shard_records(shard, teachers)`` picks the layout by the files there and
yields ``(where, Record)``, one shard in memory at most: ``.npy`` files are memory-mapped and
each sample's rows copied out, so the mapping is released when the generator is done.

What a file is is decided by its first bytes (``\x93NUMPY``: npy, ``PK\x03\x04``: npz, anything
else: pickle), never by its name; ``import_tc`` refuses pickles without ``trust_pickle`` before
anything is read. ``.npy``/``.npz`` load with ``allow_pickle=False`` after their headers are
checked (no object arrays; the shape's bytes must be exactly the bytes after the header); a
ragged column's offsets are checked against its rows, and every column's length against the
sample count, before the first sample; a teacher name becomes a file name only if it matches
``TC_FILE_RE``.
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

from bombkd_io.errors import FormatError
from bombkd_io.names import role_name

STUDENT_KEYS = ("student", "feats", "features", "student_feat", "x", "z0")
TEACHER_DICT_KEYS = ("teachers", "teacher_feats")
LABEL_KEYS = ("label", "labels", "y", "cls")
PATH_KEYS = ("path", "video", "video_path", "paths")
META_KEYS = ("meta_json", "meta", "metadata", "index", "idx")
TC_FILE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,240}$")  # a name an index gives a file
NPY_MAGIC, ZIP_MAGIC = b"\x93NUMPY", b"PK\x03\x04"


@dataclass
class Record:
    """One TC-BombKD sample, normalised."""
    student: np.ndarray          # [T', D]
    teachers: dict[str, np.ndarray]
    label: int | None
    path: str | None


def teacher_role(name) -> str:
    """A TC-BombKD teacher's role: ``names.role_name``, without the ``t_`` TC-BombKD puts before
    a teacher's column name."""
    return role_name(str(name)).removeprefix("t_")


def file_kind(path: Path) -> str:
    """"npy", "npz" or "pickle", by the file's first bytes (never by its name)."""
    with open(path, "rb") as f:
        head = f.read(6)
    return "npy" if head == NPY_MAGIC else "npz" if head[:4] == ZIP_MAGIC else "pickle"


def shard_records(shard: Path, teachers: list[str]) -> Iterator[tuple[str, Record]]:
    """One source shard's (where, record)s, read by its layout (see the module docstring)."""
    if is_ragged(shard):
        yield from _ragged_records(shard, teachers)
        return
    if shard.is_dir():
        items = _npz_items(shard) if any(shard.glob("*.npz")) else _stacked_items(shard)
    else:
        items = _load_pickle(shard)
    for i, item in enumerate(items):
        where = f"{shard} record {i}"
        yield where, _normalise(item, where, teachers)


def _load_pickle(shard: Path) -> list[dict]:
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


def _stacked_items(folder: Path) -> list[dict]:
    """Stacked columns: ``{column}.npy`` ``[N, ...]`` each (memory-mapped), ``paths.json``."""
    columns = {f.stem: _npy(f) for f in sorted(folder.glob("*.npy"))}
    if (folder / "paths.json").is_file():
        columns["path"] = json.loads((folder / "paths.json").read_text(encoding="utf-8"))
    return _columns_to_records(columns, folder)


def _npz_items(folder: Path) -> Iterator[dict]:
    """Per-sample ``.npz`` files, one loaded at a time."""
    for f in sorted(folder.glob("*.npz")):
        rec = {k: v for k, v in load_arrays(f).items() if k not in META_KEYS}
        rec.setdefault("path", f.stem)
        yield rec


def is_ragged(folder: Path) -> bool:
    return any((folder / f"student_{part}.npy").exists() for part in ("concat", "offs"))


def _ragged_records(folder: Path, teachers: list[str]) -> Iterator[tuple[str, Record]]:
    """TC-BombKD's npy_dir shard: per model ``{name}_concat.npy`` [sum T_i, D] and
    ``{name}_offs.npy`` [N+1], ``labels.npy`` and ``paths.npy`` [N]; every offset and length
    checked before the first sample."""
    files = {"student": "student", **_teacher_files(folder, teachers)}  # role -> file name stem
    models = {role: _ragged(folder, stem) for role, stem in files.items()}
    n = len(models["student"][1]) - 1
    columns = {f: _npy(folder / f) for f in ("labels.npy", "paths.npy") if (folder / f).exists()}
    lengths = {f"{stem}_offs.npy": len(models[role][1]) - 1 for role, stem in files.items()}
    lengths.update({f: len(c) if c.ndim == 1 else f"shape {list(c.shape)}"
                    for f, c in columns.items()})
    if any(length != n for length in lengths.values()):
        raise FormatError(f"{folder}: samples per file {lengths} (offsets: one less than their "
                          "count) differ; each file needs one entry per sample")
    labels, paths = columns.get("labels.npy"), columns.get("paths.npy")
    for i in range(n):
        where = f"{folder} record {i}"
        # a copy of the rows, so nothing outside this generator holds the mapping: it is
        # released when the shard is done
        feats = {role: np.array(concat[offs[i]:offs[i + 1]])  # [T_i, D]
                 for role, (concat, offs) in models.items()}
        yield where, _record(feats.pop("student"), feats, None if labels is None else labels[i],
                             None if paths is None else paths[i], where)


def _teacher_files(folder: Path, teachers: list[str]) -> dict[str, str]:
    """Role -> file name stem of each teacher of a ragged shard: the index's teachers, with ``/``
    as ``_`` as TC-BombKD names the files; without an index, every other ``*_concat.npy``."""
    stems = {t: t.replace("/", "_") for t in teachers} or {
        s: s for p in sorted(folder.glob("*_concat.npy"))
        if (s := p.name.removesuffix("_concat.npy")) != "student"}
    bad = next((s for s in stems.values() if not TC_FILE_RE.fullmatch(f"{s}_concat.npy")), None)
    if bad is not None:
        raise FormatError(f"{folder}: teacher {bad!r} cannot name a file (letters, digits, "
                          "'_', '-', '.'); refusing to read it")
    roles = {teacher_role(t): s for t, s in stems.items()}
    if len(roles) != len(stems) or "student" in roles:
        raise FormatError(f"{folder}: teachers {sorted(stems)} give the roles {sorted(roles)}; "
                          "each teacher needs its own role, other than 'student'")
    return roles


def _ragged(folder: Path, stem: str) -> tuple[np.ndarray, np.ndarray]:
    """``{stem}_concat.npy`` [R, D] (memory-mapped) and its offsets ``{stem}_offs.npy`` [N+1]:
    0 first, never decreasing, R last."""
    concat, offs = _npy(folder / f"{stem}_concat.npy"), _npy(folder / f"{stem}_offs.npy")
    if concat.ndim != 2 or not np.issubdtype(concat.dtype, np.floating):
        raise FormatError(f"{folder / f'{stem}_concat.npy'}: expected float rows [sum T_i, D], "
                          f"got {concat.dtype}{list(concat.shape)}")
    if offs.ndim != 1 or len(offs) == 0 or not np.issubdtype(offs.dtype, np.integer):
        raise FormatError(f"{folder / f'{stem}_offs.npy'}: expected integer offsets [N+1], got "
                          f"{offs.dtype}{list(offs.shape)}")
    offs = np.asarray(offs, np.int64)  # [N+1]: small, read whole
    if problem := _offsets_problem(offs, len(concat)):
        raise FormatError(f"{folder / f'{stem}_offs.npy'}: {problem} of {stem}_concat.npy; "
                          "offsets must start at 0, never decrease and end at the row count")
    return concat, offs


def _offsets_problem(offs: np.ndarray, rows: int) -> str | None:
    down = np.flatnonzero(np.diff(offs) < 0)
    if offs[0] != 0:
        return f"offs[0] is {offs[0]}, not 0"
    if len(down):
        i = down[0]
        return f"offs[{i + 1}] = {offs[i + 1]} is below offs[{i}] = {offs[i]}"
    if offs[-1] != rows:
        return f"the last offset is {offs[-1]}, not the {rows} rows"
    return None


def _npy(path: Path) -> np.ndarray:
    """The array of an ``.npy`` file, memory-mapped after its header is checked."""
    if not path.is_file():
        raise FormatError(f"{path}: missing, or not a file")
    if file_kind(path) != "npy":
        raise FormatError(f"{path}: not an .npy file (no numpy signature)")
    return load_arrays(path)[path.stem]


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
    """An npy header: no object dtype, and a shape whose bytes are the ``size - header`` bytes
    after it, exactly (a longer claim is truncated or crafted; a shorter one hides bytes)."""
    version = np.lib.format.read_magic(f)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    shape, _, dtype = read(f)
    if dtype.hasobject:
        raise FormatError(f"{where}: holds Python objects (a pickle inside); only numeric "
                          "arrays are read")
    nbytes, held = dtype.itemsize * int(np.prod(shape, dtype=object)), size - f.tell()
    if nbytes != held:
        raise FormatError(f"{where}: declares shape {list(shape)} {dtype} ({nbytes} bytes), "
                          f"but holds {held} bytes after its header: truncated or crafted")


def _normalise(item, where: str, teacher_names: list[str]) -> Record:
    if not isinstance(item, dict):
        raise FormatError(f"{where}: expected a dict record, got {type(item).__name__}")
    skey = next((k for k in STUDENT_KEYS if k in item), None)
    if skey is None:
        raise FormatError(f"{where}: no student features (looked for {list(STUDENT_KEYS)}; "
                          f"record has {sorted(item)})")
    teachers = {}
    for key in TEACHER_DICT_KEYS:
        teachers.update({teacher_role(n): v for n, v in (item.get(key) or {}).items()})
    known = {skey, *TEACHER_DICT_KEYS, *LABEL_KEYS, *PATH_KEYS, *META_KEYS}
    named = {*teacher_names, *(f"t_{t}" for t in teacher_names)}
    for key, value in item.items():  # flat teachers: the index's names, else float arrays
        if key not in known and (key in named if named else _is_features(value)):
            teachers[teacher_role(key)] = value
    return _record(item[skey], teachers, next((item[k] for k in LABEL_KEYS if k in item), None),
                   next((item[k] for k in PATH_KEYS if k in item), None), where)


def _record(student, teachers: dict, label, path, where: str) -> Record:
    """A Record of raw values, each checked (label -1 or none: unlabelled)."""
    label = _label(label, where)
    return Record(_features(student, where, "student"),
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
