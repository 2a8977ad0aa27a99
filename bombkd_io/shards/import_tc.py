"""Convert a TC-BombKD feature cache (``polyspace.data.featurize``) into a format-1 cache.

Accepted input (``SRC``), the layouts TC-BombKD writes plus a pickle-free one:

- an index ``features_{dataset}_{split}.index.json`` (or a directory holding one), a JSON object
  with ``"shards"``: a list of ``{"file": NAME, "start": int, "count": int}`` or of names. A NAME
  is a plain file name beside the index; the index's ``"storage"`` says what it names:
  ``"npy_dir"`` (TC-BombKD's default) the directory NAME, ``"pkl"`` the file ``NAME.pkl`` (NAME
  itself if it already ends in ``.pkl``), no ``storage`` NAME itself (older writers, which named
  the ``.pkl``). Optional: ``dataset``, ``split``, ``student``, ``teachers``, ``num_frames``,
  ``frames_student``, ``frames_teachers``, ``classes``. A ``count`` must match the shard;
- one ``.pkl`` file (``features_{dataset}_{split}.pkl``), or a directory of
  ``features_*_shard_*.pkl`` files without an index (read in name order);
- an npy_dir (a shard directory), in one of three layouts: *ragged columns*, what TC-BombKD's
  sharded ``storage="npy_dir"`` writes: for the student and each teacher, ``{name}_concat.npy``
  ``[sum T_i, D]`` (every sample's rows, stacked) and ``{name}_offs.npy`` ``[N+1]`` (sample ``i``
  is rows ``offs[i]:offs[i+1]``; ``name`` is ``student`` or the teacher's name with ``/`` as
  ``_``), optional ``labels.npy`` and ``paths.npy`` ``[N]``; *stacked columns*: ``student.npy``
  ``[N, T', D]``, ``<teacher>.npy`` ``[N, T', D]``, optional ``labels.npy`` ``[N]`` and
  ``paths.json`` or ``paths.npy``; or per-sample ``*.npz`` files (``z0``/``student`` and
  ``t_<teacher>``/``<teacher>`` arrays, optional ``label``).

Pickle records, the student and teacher key names accepted, and how each shard is read as
hostile (file kind by content, npy headers and offsets checked, one shard in memory) are
``tc_shards.py``'s.

Every sample of a model must have the first sample's ``[T', D]``: format 1 stores one shape per
model, because the fusion head takes ``[B, T', D]`` batches. A source whose token counts vary
(TC-BombKD pads them per batch) is refused, naming the first odd record, and nothing is kept.

The import streams: one source shard at a time, output shards written as samples arrive. The
source may be a stranger's: pickle shards are refused without ``trust_pickle`` before anything
is read; the names an index gives shards must match ``tc_shards.TC_FILE_RE`` (plain names
beside the index) before they become paths; the dataset and split must be valid names
(``bombkd_io.names``); nothing is written outside ``out``, nothing there is overwritten, and a
failed import leaves no shard.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bombkd_io.atomic import folder_problem
from bombkd_io.datasets import VideoItem, item_key
from bombkd_io.errors import ConfigError, DatasetError, FormatError
from bombkd_io.names import check_name, name_problem
from bombkd_io.sampling import DEFAULT_SHARD_SIZE
from bombkd_io.shards.codec import DTYPES
from bombkd_io.shards.manifest import Manifest, ModelEntry, manifest_path, save_manifest
from bombkd_io.shards.tc_shards import (TC_FILE_RE, Record, file_kind, is_ragged, shard_records,
                                        teacher_role)
from bombkd_io.shards.writer import ShardSetWriter
from bombkd_io.storage import is_remote

TC_NAME_RE = re.compile(  # features_{dataset}_{split}[_shard_NNNNN](.index.json|.pkl)
    r"^features_(?P<dataset>.+)_(?P<split>[^_]+?)(?:_shard_\d+)?(?:\.index\.json|\.pkl)$")
PICKLE_HELP = ("pickle files can run arbitrary code when loaded; pass --trust-pickle only for a "
               "cache you made yourself or trust")
STORAGES = ("npy_dir", "pkl")  # an index's "storage": what its shard names name
INDEX_META = ("dataset", "split", "student", "teachers", "dtype", "num_frames", "frames_student",
              "frames_teachers", "classes")


@dataclass
class Source:
    """What SRC points at: its shards (pkl files, npy dirs) in sample order, the index's fields
    and path, if any, and the sample count the index gives a shard."""
    shards: list[Path]
    index: dict
    name_hint: dict  # dataset/split parsed from the file name
    index_path: Path | None = None
    counts: dict[Path, int] = field(default_factory=dict)


def import_tc_cache(src: str | Path, out: str | Path, *, split: str | None = None, dataset: str | None = None,
                    trust_pickle: bool = False, shard_size: int = DEFAULT_SHARD_SIZE,
                    dtype: str | None = None, progress: bool = False) -> Manifest:
    """Convert ``src`` into ``{dataset}-{split}`` format-1 shards under ``out`` (a folder, or a
    URL: written into a local stage, then uploaded, the manifest last); its manifest.
    ``progress``: a bar of samples on stderr."""
    if is_remote(out):
        from bombkd_io.shards.publish import staged_out

        with staged_out(out) as (stage, remote):
            manifest = import_tc_cache(src, stage, split=split, dataset=dataset,
                                       trust_pickle=trust_pickle, shard_size=shard_size,
                                       dtype=dtype, progress=progress)
            remote.cache(manifest)
        return manifest
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
    return _convert(source, out, dataset, split, shard_size, dtype, meta, progress)


def _convert(source: Source, out: Path, dataset: str, split: str, shard_size: int,
             dtype: str | None, meta: dict, progress: bool) -> Manifest:
    writers: dict[str, ShardSetWriter] = {}
    shapes, labels, paths = {}, [], []
    known = len(source.counts) == len(source.shards)
    records = tqdm(_records(source), total=sum(source.counts.values()) if known else None,
                   desc=f"import {dataset}-{split}", unit="sample", disable=not progress)
    try:
        for where, rec in records:
            if not writers:
                dtype = dtype or ("float16" if rec.student.dtype == np.float16 else "float32")
                writers = {m: ShardSetWriter(out, dataset, split, m, shard_size, dtype)
                           for m in ["student", *rec.teachers]}
                shapes = _shapes(rec)
            _check_like_first(where, rec, shapes)
            key = item_key(len(labels), VideoItem(rec.path or "", rec.label or 0, ""))
            extra = {"json": {"path": rec.path or "", "source": where}}
            if rec.label is not None:
                extra["cls"] = rec.label
            writers["student"].write(key, rec.student, extra)
            for name, feats in rec.teachers.items():
                writers[name].write(key, feats)
            labels.append(rec.label)
            paths.append(rec.path)
        entries = {m: w.close() for m, w in writers.items()}
    except BaseException:
        _discard(out, writers)
        raise
    finally:
        records.close()
    if not labels:
        raise DatasetError(f"{source.shards[0] if source.shards else 'source'}: no samples")
    return _save(out, dataset, split, shard_size, meta, entries, shapes, labels, paths, dtype)


def _discard(out: Path, writers: dict[str, ShardSetWriter]) -> None:
    """Remove every shard this import wrote: ``out`` held none of this split before (checked), and
    a half-imported cache would only make the next try refuse the folder."""
    for writer in writers.values():
        writer.abort()
        for entry in writer.entries:
            (out / entry.name).unlink(missing_ok=True)


def _save(out, dataset, split, shard_size, meta, entries, shapes, labels, paths, dtype):
    labelled = all(label is not None for label in labels)
    backbones = {"student": str(meta.get("student") or "unknown")}
    backbones.update({teacher_role(t): str(t) for t in meta.get("teachers") or []})
    frames = {"student": meta.get("frames_student")}
    frames.update({teacher_role(t): f for t, f in (meta.get("frames_teachers") or {}).items()})
    models = {m: ModelEntry(m, backbones.get(m, m), shapes[m][1], shapes[m][0],
                            frames.get(m) or meta.get("num_frames") or 0, 0, "unknown", dtype, e)
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


def _shapes(rec: Record) -> dict[str, tuple[int, ...]]:
    return {"student": rec.student.shape, **{n: f.shape for n, f in rec.teachers.items()}}


def _check_like_first(where: str, rec: Record, first: dict[str, tuple[int, ...]]) -> None:
    """The record has the first record's models, each of the same ``[T', D]``."""
    if set(rec.teachers) != set(first) - {"student"}:
        raise FormatError(f"{where}: teachers {sorted(rec.teachers)}, but earlier samples have "
                          f"{sorted(set(first) - {'student'})}; every sample needs the same "
                          "teachers")
    shapes = _shapes(rec)
    odd = next((m for m in shapes if shapes[m] != first[m]), None)
    if odd is not None:
        raise FormatError(
            f"{where} ({rec.path or 'no path'}): {odd} features {list(shapes[odd])}, but the "
            f"first sample's are {list(first[odd])}; a bombkd cache holds one [tokens, dim] per "
            "model (the fusion head takes [B, T', D] batches), so a source whose token counts "
            "differ between samples is not imported: re-extract it with a fixed frame count "
            "and input size")


def _records(source: Source) -> Iterator[tuple[str, Record]]:
    """Yields (where, record) over every shard in order, one shard at a time."""
    teachers = source.index.get("teachers") or []
    for shard in source.shards:
        n = yield from _counted(shard_records(shard, teachers))
        if shard in source.counts and n != source.counts[shard]:
            raise FormatError(f"{source.index_path}: lists count={source.counts[shard]} for "
                              f"{shard.name}, which holds {n} samples")


def _counted(items: Iterator) -> Iterator:
    """Yields ``items``; returns how many there were."""
    n = 0
    for n, item in enumerate(items, 1):
        yield item
    return n



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
    if is_ragged(src) or (src / "student.npy").is_file() or any(src.glob("*.npz")):
        return Source([src], {}, {})
    raise DatasetError(f"{src}: no TC-BombKD index, pkl shards, single pkl or npy_dir found "
                       f"(holds {sorted(p.name for p in src.iterdir())[:10]})")


def _name_hint(name: str) -> dict:
    m = TC_NAME_RE.fullmatch(name)
    return {"dataset": m["dataset"], "split": m["split"]} if m else {}


def _from_index(path: Path) -> Source:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        entries = index["shards"]
        if not isinstance(entries, list) or not entries:
            raise ValueError("'shards' must be a non-empty list")
        rows = [(e, None, None) if isinstance(e, str) else
                (e.get("file") or e.get("path") or e["shard"], e.get("start"), e.get("count"))
                for e in entries]
        if all(start is not None for _, start, _ in rows):
            rows.sort(key=lambda row: int(row[1]))
        counts = [None if count is None else _count(count) for _, _, count in rows]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise FormatError(f"{path}: not a TC-BombKD index ({type(exc).__name__}: {exc}); "
                          "expected {\"shards\": [{\"file\": ..., \"start\": ...}, ...]}") from exc
    meta = {k: index.get(k) for k in INDEX_META}
    _check_index_types(path, meta, index.get("storage"))
    names = [name for name, _, _ in rows]
    bad = next((n for n in names if not isinstance(n, str) or not TC_FILE_RE.fullmatch(n)), None)
    if bad is not None:
        raise FormatError(f"{path}: lists shard {bad!r}; an index may only name files beside "
                          "it (letters, digits, '_', '-', '.'; no paths); refusing to read it")
    shards = [path.parent / _shard_file(n, index.get("storage")) for n in names]
    missing = [str(s) for s in shards if not s.exists()]
    if missing:
        raise DatasetError(f"{path}: lists shards that do not exist: {missing[:5]} (storage "
                           f"{index.get('storage')!r}: {STORAGE_HELP})")
    if index.get("storage") == "npy_dir" and (odd := next((s for s in shards if not s.is_dir()),
                                                            None)):
        raise FormatError(f"{path}: storage 'npy_dir', but {odd} is not a directory")
    return Source(shards, meta, _name_hint(path.name), path,
                  {s: c for s, c in zip(shards, counts) if c is not None})


STORAGE_HELP = ("an index's shard NAME is the directory NAME for 'npy_dir', the file NAME.pkl "
                "for 'pkl', NAME itself with no storage")


def _shard_file(name: str, storage) -> str:
    """The file an index's shard NAME is, by the index's storage (see ``STORAGE_HELP``)."""
    return f"{name}.pkl" if storage == "pkl" and not name.endswith(".pkl") else name


def _count(value) -> int:
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise ValueError(f"count {value!r} is not a sample count")
    return int(value)


def _check_index_types(path: Path, meta: dict, storage) -> None:
    """The index fields bombkd uses have the types TC-BombKD writes; FormatError otherwise."""
    teachers, frames = meta["teachers"] or [], meta["frames_teachers"] or {}
    problems = [
        storage not in (None, *STORAGES) and f"storage {storage!r} is not one of {STORAGES}",
        not (isinstance(teachers, list) and all(isinstance(t, str) for t in teachers))
        and f"teachers {teachers!r:.60} is not a list of names",
        not (isinstance(frames, dict) and all(_is_count(f) for f in frames.values()))
        and f"frames_teachers {frames!r:.60} is not a {{teacher: frames}} object",
        *(f"{k} {meta[k]!r:.40} is not a frame count" for k in ("num_frames", "frames_student")
          if meta[k] is not None and not _is_count(meta[k])),
        meta["classes"] is not None and not isinstance(meta["classes"], list)
        and f"classes {meta['classes']!r:.40} is not a list"]
    if problem := next((p for p in problems if p), None):
        raise FormatError(f"{path}: {problem}; refusing to read it")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


