"""The cache manifest ``{dataset}-{split}.index.json``: what a cache holds and how to check it.

Written last and atomically, so a cache with a manifest is complete; until then featurize keeps
a progress file ``{dataset}-{split}.progress.json`` beside the shards (storing each model with
``ModelEntry.to_json`` too), and a reader that finds one (or shards) but no manifest says the
featurize run is unfinished and how to finish it. Readers refuse another ``format`` or
``version`` with an error naming the expected value. A manifest may be a stranger's: before
anything is built from it, every name must fit ``bombkd_io.names`` (a shard is exactly
``{dataset}-{split}-{model}-{k:06d}.tar``, ``misnamed_shard``) and every count and size the
limits below, checked without allocating in proportion to what the file claims.
"""
from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bombkd_io.atomic import atomic_path
from bombkd_io.errors import DatasetError, FormatError
from bombkd_io.names import (MANIFEST_SUFFIX, check_name, is_url, locate, manifest_name,
                             name_problem, name_problems, shard_name)
from bombkd_io.storage import exists, is_remote, list_names, read_bytes
from bombkd_io.sampling import shard_ranges
from bombkd_io.shards.codec import DTYPES

FORMAT_NAME = "bombkd-features"
FORMAT_VERSION = 1
PROGRESS_SUFFIX = ".progress.json"  # featurize's record of an unfinished run (bombkd_train)
# Sanity bounds on what a manifest (possibly a stranger's) may ask a reader to allocate.
MAX_SHARD_BYTES = 64 << 30   # one shard file, and one shard's decoded features
MAX_SHARD_SIZE = 1 << 24     # samples per shard
MAX_MANIFEST_BYTES = 256 << 20  # the manifest file itself (a million shards is ~200 MB)


@dataclass(frozen=True)
class ShardEntry:
    name: str    # file name, relative to the cache root
    count: int   # samples in the shard
    bytes: int   # file size
    sha256: str  # hex digest of the whole file

    @classmethod
    def from_json(cls, data: dict) -> ShardEntry:
        return cls(_str(data["name"]), _int(data["count"]), _int(data["bytes"]),
                   _str(data["sha256"]))


@dataclass
class ModelEntry:
    """One model's shard set in a manifest: the backbone and clip it came from, its shards."""

    name: str      # role: "student" or a teacher name
    backbone: str  # registry name or hub id the features came from
    dim: int       # D
    tokens: int    # T' (after pooling)
    frames: int    # frames per clip fed to the backbone
    size: int      # clip side in pixels
    pooling: str
    dtype: str     # "float16" | "float32"
    shards: list[ShardEntry] = field(default_factory=list)
    # Where the features came from (optional in format 1: None when not recorded).
    source: str | None = None       # hub id or directory the weights were loaded from
    revision: str | None = None     # hub revision asked for (None: the default branch)
    weights: str | None = None      # "commit:<hash>" | "files-sha256:<hex>" | "state-sha256:<hex>"
    model_dtype: str | None = None  # the parameters' dtype while featurizing
    mean: list[float] | None = None  # normalisation, on the 0..1 pixel scale
    std: list[float] | None = None
    bombkd: str | None = None       # the bombkd version that wrote the shards

    @property
    def count(self) -> int:
        """Samples in this model's shards."""
        return sum(s.count for s in self.shards)

    @property
    def bytes(self) -> int:
        """Bytes of this model's shard files."""
        return sum(s.bytes for s in self.shards)

    def to_json(self, shards: list | dict | None = None) -> dict:
        """What a manifest, and featurize's progress file, store under the model's name: every
        field but the name, with ``shards`` as given (default: this entry's, as a list)."""
        out = {k: v for k, v in asdict(self).items()
               if not (k in OPTIONAL_FIELDS and v is None)}  # old readers never see them
        del out["name"]
        if shards is not None:
            out["shards"] = shards
        return out

    @classmethod
    def from_json(cls, name: str, data: dict, shards: Iterable[ShardEntry] = ()) -> ModelEntry:
        """The inverse of ``to_json``, given the shards (read by the caller: their layout
        differs between a manifest and a progress file); TypeError for a value of the wrong
        type."""
        optional = {k: _optional(data.get(k), kind) for k, kind in OPTIONAL_FIELDS.items()}
        return cls(name, _str(data["backbone"]), _int(data["dim"]), _int(data["tokens"]),
                   _int(data["frames"]), _int(data["size"]), _str(data["pooling"]),
                   _str(data["dtype"]), list(shards), **optional)

    def contradictions(self, **wanted: object) -> dict[str, tuple]:
        """The fields whose recorded value is not the ``wanted`` one, as ``field -> (recorded,
        wanted)``: what a new run would contradict. A ``wanted`` None takes any value, and so
        does a field a manifest did not record (None)."""
        return {key: (getattr(self, key), value) for key, value in wanted.items()
                if value is not None and getattr(self, key) not in (None, value)}


# The optional fields of a model entry and their JSON type: "str", or "floats" (a list of 3).
OPTIONAL_FIELDS = {"source": "str", "revision": "str", "weights": "str", "model_dtype": "str",
                   "mean": "floats", "std": "floats", "bombkd": "str"}


def _optional(value, kind: str):
    """An optional field's value (None if absent); TypeError for one of the wrong type."""
    if value is None:
        return None
    if kind == "str":
        return _str(value)
    if not (isinstance(value, list) and len(value) == 3 and
            all(type(v) in (int, float) for v in value)):
        raise TypeError(f"expected a list of 3 numbers, got {value!r:.40}")
    return [float(v) for v in value]


@dataclass
class Manifest:
    """A split's cache, as ``{dataset}-{split}.index.json`` records it (FORMAT.md)."""

    dataset: str
    split: str
    classes: list[str]
    shard_size: int
    models: dict[str, ModelEntry]          # role -> entry; "student" first, then teachers
    count: int                             # samples in every model's shard set
    failed: list[dict] = field(default_factory=list)  # [{"path", "reason"}] not in the cache
    labels: bool = True                    # student samples carry KEY.cls
    # [{"path", "reason"}] in the cache, but read or decoded with warnings (optional in format 1)
    suspect: list[dict] = field(default_factory=list)

    def model(self, name: str) -> ModelEntry:
        """The entry of model ``name``; else a ``DatasetError`` listing what the cache holds."""
        if name not in self.models:
            raise DatasetError(
                f"the {self.dataset}-{self.split} cache has no features for model {name!r}; "
                f"it holds {sorted(self.models)} (add it with `bombkd featurize --resume`)")
        return self.models[name]

    def to_json(self) -> dict:
        """The manifest file's JSON document (``save_manifest`` writes it)."""
        out = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "dataset": self.dataset,
               "split": self.split, "classes": list(self.classes), "shard_size": self.shard_size,
               "count": self.count, "labels": self.labels,
               "models": {name: m.to_json() for name, m in self.models.items()},
               "failed": list(self.failed)}
        if self.suspect:  # written only when there are some: older readers never see it
            out["suspect"] = list(self.suspect)
        return out


def manifest_path(root: str | Path, dataset: str, split: str) -> str | Path:
    """``root/{dataset}-{split}.index.json`` (a ``Path`` under a local root, a URL under a URL);
    ``ConfigError`` for a dataset or split that is not a valid name (``--split ../x`` must not
    reach outside ``root``)."""
    name = manifest_name(check_name(dataset, "dataset"), check_name(split, "split"))
    return locate(root if is_url(root) else str(root), name)


def manifest_sha256(manifest: Manifest) -> str:
    """sha256 of the manifest's content (its JSON, keys sorted): where it is stored and how it
    is indented do not count, any change to what it records does. A training checkpoint records
    it, so a resume against a cache that changed since is refused."""
    text = json.dumps(manifest.to_json(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def progress_path(root: str | Path, dataset: str, split: str, rank: int | None = None) -> Path:
    """One process's progress file; ``rank``: that of one of several processes writing the
    cache together (``{dataset}-{split}.rank{R}.progress.json``)."""
    own = "" if rank is None else f".rank{int(rank)}"
    return Path(root) / f"{dataset}-{split}{own}{PROGRESS_SUFFIX}"


def rank_progress_paths(root: str | Path, dataset: str, split: str) -> dict[int, Path]:
    """rank -> progress file, for every rank's file in ``root`` (names matched exactly)."""
    found = {}
    for path in Path(root).glob(f"{glob.escape(dataset)}-{glob.escape(split)}.rank*"
                                f"{PROGRESS_SUFFIX}"):
        rank = path.name[len(f"{dataset}-{split}.rank"):-len(PROGRESS_SUFFIX)]
        if rank.isascii() and rank.isdigit() and path.name == progress_path(
                root, dataset, split, int(rank)).name:
            found[int(rank)] = path
    return dict(sorted(found.items()))


def save_manifest(manifest: Manifest, root: str | Path) -> Path:
    """Check and write the manifest atomically (temp file, then rename); returns its path."""
    problems = check_manifest(manifest)
    if problems:
        raise FormatError("refusing to write an inconsistent manifest: " + "; ".join(problems))
    path = manifest_path(root, manifest.dataset, manifest.split)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest.to_json(), f, indent=1)
        f.write("\n")
    return path


def load_manifest(root: str | Path, split: str, dataset: str | None = None) -> Manifest:
    """Find and read ``{dataset}-{split}.index.json`` under ``root`` (a folder or a URL, read
    with ``bombkd_io.storage``; any dataset if not given)."""
    check_name(split, "split")
    if dataset is not None and is_remote(root) and exists(manifest_path(root, dataset, split)):
        return read_manifest(manifest_path(root, dataset, split))  # no listing (plain HTTP)
    names = list_names(root)
    if is_remote(root) and not names:
        raise DatasetError(f"{root}: nothing under this URL (no cache; make one with `bombkd "
                           "featurize --out URL`)")
    if dataset is not None:
        wanted = manifest_name(check_name(dataset, "dataset"), split)
        found = [n for n in names if n == wanted]
    else:
        found = fnmatch.filter(names, f"*-{split}{MANIFEST_SUFFIX}")
    if not found:
        raise DatasetError(_missing_message(root, names, split, dataset))
    if len(found) > 1:
        raise DatasetError(f"{root}: several caches for split {split!r} ({found}); pass --dataset")
    return read_manifest(locate(root if is_url(root) else str(root), found[0]))


def _missing_message(root, names: list[str], split: str, dataset: str | None) -> str:
    wanted = f"{dataset or '<dataset>'}-{split}{MANIFEST_SUFFIX}"
    unfinished = _unfinished_message(root, names, split, dataset, wanted)
    if unfinished:
        return unfinished
    splits = [n[:-len(MANIFEST_SUFFIX)] for n in fnmatch.filter(names, f"*-*{MANIFEST_SUFFIX}")]
    if splits:  # a cache without this split: name the ones it has, not its shards
        have = ", ".join(s.rsplit("-", 1)[-1] + ("" if dataset else f" ({s.rsplit('-', 1)[0]})")
                         for s in splits if not dataset or s.startswith(f"{dataset}-"))
        return (f"{root}: no split {split!r} in this cache (no {wanted}); it has "
                f"{have or 'no split of ' + str(dataset)}; pass one of them as --split, or "
                f"featurize split {split!r} into it")
    listing = ", ".join(names[:20])
    if len(names) > 20:
        listing += f", ... ({len(names)} entries)"
    hint = "run `bombkd featurize` first"
    if any(n.startswith("features_") and (n.endswith(".index.json") or n.endswith(".pkl"))
           for n in names):
        hint = "this looks like a TC-BombKD cache: convert it with `bombkd import-cache`"
    return f"{root}: no manifest {wanted}; the directory holds [{listing or 'nothing'}]; {hint}"


def _unfinished_message(root, names: list[str], split: str, dataset: str | None,
                        wanted: str) -> str | None:
    """What to do about a featurize run into ``root`` that has not written its manifest (it
    left a progress file or shards); None if there is no sign of one."""
    pattern = f"{dataset or '*'}-{split}"
    progress = (fnmatch.filter(names, pattern + PROGRESS_SUFFIX)
                + fnmatch.filter(names, pattern + ".rank*" + PROGRESS_SUFFIX))
    shards = (fnmatch.filter(names, pattern + "-*.tar")
              + fnmatch.filter(names, pattern + "-*.tar.tmp"))
    if not progress and not shards:
        return None
    found = (progress or shards)[0]
    if not dataset and progress:
        dataset = found[:found.rindex(f"-{split}.")]
    command = (f"`bombkd featurize --dataset {dataset or '<dataset>'} --split {split} --out "
               f"{root} --resume`")
    if ".rank" in found:  # several processes wrote it: the manifest may be all that is missing
        command += " (or `--finalize` once every rank is done)"
    return (f"{root}: the featurize run into this folder is unfinished ({found} is there, the "
            f"manifest {wanted} is not); finish it with {command} and the first run's other "
            "arguments (--root, --student, --teachers)")


def read_manifest(path: str | Path) -> Manifest:
    """Parse and check one manifest file (a path or a URL); ``FormatError`` naming the file and
    the problem."""
    try:
        data = json.loads(read_bytes(path, MAX_MANIFEST_BYTES).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise FormatError(f"{path}: not a readable JSON manifest ({why}); bombkd writes it "
                          "last and atomically, so it was changed since: restore it, or "
                          "featurize again into a new --out") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise FormatError(f"{path}: format is {got!r}, expected {FORMAT_NAME!r}")
    if data.get("version") != FORMAT_VERSION:
        raise FormatError(f"{path}: {FORMAT_NAME} version {data.get('version')!r} is not "
                          f"supported; expected version {FORMAT_VERSION} (upgrade bombkd, or "
                          "featurize again into a new --out)")
    try:
        manifest = _from_json(data)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise FormatError(f"{path}: malformed manifest ({type(exc).__name__}: {exc})") from exc
    problems = check_manifest(manifest)
    if problems:
        raise FormatError(f"{path}: " + "; ".join(problems))
    return manifest


def _from_json(data: dict) -> Manifest:
    models = {name: ModelEntry.from_json(name, m, [ShardEntry.from_json(s) for s in m["shards"]])
              for name, m in data["models"].items()}
    return Manifest(_str(data["dataset"]), _str(data["split"]),
                    [_str(c) for c in data["classes"]], _int(data["shard_size"]), models,
                    _int(data["count"]), _videos(data.get("failed", [])),
                    bool(data.get("labels", True)), _videos(data.get("suspect", [])))


def _videos(entries: list) -> list[dict]:
    """A manifest's list of videos with a reason (``failed``, ``suspect``)."""
    return [{"path": _str(v["path"]), "reason": _str(v["reason"])} for v in entries]


def _int(value) -> int:
    """A JSON integer (not a bool, a float or a string of digits)."""
    if type(value) is not int:
        raise TypeError(f"expected an integer, got {value!r:.40}")
    return value


def _str(value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r:.40}")
    return value


def check_manifest(m: Manifest) -> list[str]:
    """Every inconsistency at once: names, dtypes, and shard k of every model covering
    samples ``[k*S, (k+1)*S)`` (the epoch order relies on it) under its one valid name.

    Counts are compared arithmetically first: nothing here grows with what ``count`` claims."""
    problems = name_problems((m.dataset, "dataset"), (m.split, "split"))
    if problems:
        return problems  # shard names are built from these
    if not 1 <= m.shard_size <= MAX_SHARD_SIZE:
        return [f"shard_size must be in [1, {MAX_SHARD_SIZE}], got {m.shard_size}"]
    if "student" not in m.models:
        problems.append(f"no 'student' model (models: {sorted(m.models)})")
    num_shards = -(-m.count // m.shard_size) if m.count >= 0 else -1
    for name, entry in m.models.items():
        if problem := name_problem(name, "model"):
            problems.append(problem)
            continue
        if entry.dtype not in DTYPES:
            problems.append(f"model {name}: dtype {entry.dtype!r} not in {sorted(DTYPES)}")
        if len(entry.shards) != num_shards:
            problems.append(f"model {name}: {len(entry.shards)} shards listed; count={m.count} "
                            f"in shards of {m.shard_size} needs {max(num_shards, 0)}")
            continue
        expected = [len(r) for r in shard_ranges(m.count, m.shard_size)]
        counts = [s.count for s in entry.shards]
        if counts != expected:
            problems.append(f"model {name}: shard counts {counts[:8]} do not split "
                            f"count={m.count} into shards of {m.shard_size}")
        if problem := misnamed_shard(m.dataset, m.split, name, enumerate(entry.shards)):
            problems.append(problem)
        problems += _size_problems(name, entry, m.shard_size)
    return problems


def misnamed_shard(dataset: str, split: str, model: str,
                   shards: Iterable[tuple[int, ShardEntry]]) -> str | None:
    """Why the first of ``(k, shard)`` not named ``shard_name(dataset, split, model, k)`` is
    refused, or None: a name read from a file must be exactly the one for its position."""
    for k, s in shards:
        if s.name != (expected := shard_name(dataset, split, model, k)):
            return (f"model {model}: shard {k} is named {s.name!r}, not {expected!r} (a shard "
                    "is named {dataset}-{split}-{model}-{k:06d}.tar: no paths, no URLs)")
    return None


def _size_problems(name: str, entry: ModelEntry, shard_size: int) -> list[str]:
    """Shapes and sizes a reader can allocate: at most ``MAX_SHARD_BYTES`` per shard, both the
    file and its decoded ``[S, T', D]`` features."""
    problems = []
    if entry.tokens < 1 or entry.dim < 1:
        problems.append(f"model {name}: feature shape [{entry.tokens}, {entry.dim}] must be "
                        "positive")
    elif entry.dtype in DTYPES:
        decoded = shard_size * entry.tokens * entry.dim * DTYPES[entry.dtype].itemsize
        if decoded > MAX_SHARD_BYTES:
            problems.append(f"model {name}: a shard of {shard_size} x [{entry.tokens}, "
                            f"{entry.dim}] {entry.dtype} is {decoded} bytes decoded, over the "
                            f"limit of {MAX_SHARD_BYTES}")
    for s in entry.shards:
        if not 0 <= s.bytes <= MAX_SHARD_BYTES:
            problems.append(f"model {name}: shard {s.name} lists {s.bytes} bytes, outside "
                            f"[0, {MAX_SHARD_BYTES}]")
    return problems


def summarize(m: Manifest, root: str | Path | None = None) -> str:
    """A human summary: dataset, counts, each model's shape, dtype and bytes, and where its
    features came from; the failed videos (not in the cache) and the suspect ones (in it, but
    read or decoded with warnings)."""
    where = f" in {root}" if root is not None else ""
    lines = [f"{m.dataset}-{m.split}{where}: {FORMAT_NAME} v{FORMAT_VERSION}, {m.count} samples, "
             f"{len(m.classes)} classes, shards of {m.shard_size}, labels: "
             f"{'yes' if m.labels else 'no'}"]
    for name, e in m.models.items():
        lines.append(f"  {name:<12} {e.backbone:<24} [{e.tokens}, {e.dim}] {e.dtype:<8} "
                     f"{len(e.shards)} shards, {e.count} samples, {e.bytes / 1e6:.1f} MB "
                     f"(frames {e.frames}, size {e.size}, pooling {e.pooling})")
        lines.append("    " + _provenance(e))
    total = sum(e.bytes for e in m.models.values())
    lines.append(f"  total {total / 1e6:.1f} MB; failed videos: {len(m.failed)}")
    lines += _listed(m.failed)
    if m.suspect:
        lines.append(f"  suspect videos (cached, but read or decoded with warnings; "
                     f"`bombkd featurize --strict` leaves them out): {len(m.suspect)}")
        lines += _listed(m.suspect)
    return "\n".join(lines)


def _provenance(e: ModelEntry) -> str:
    """One line: the weights, their dtype, the normalisation and the bombkd version."""
    if e.weights is None:
        return "weights: not recorded (a manifest written before bombkd recorded them)"
    source = e.source or f"{e.backbone} (built-in, random from a fixed seed)"
    revision = f" @ {e.revision}" if e.revision else ""
    return (f"weights: {source}{revision}, {e.weights}; {e.model_dtype}, mean {_floats(e.mean)}, "
            f"std {_floats(e.std)}; bombkd {e.bombkd}")


def _floats(values: list[float] | None) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]" if values else "?"


def _listed(videos: list[dict], shown: int = 20) -> list[str]:
    lines = [f"    {v['path']}: {v['reason']}" for v in videos[:shown]]
    if len(videos) > shown:
        lines.append(f"    ... and {len(videos) - shown} more")
    return lines
