"""The cache manifest ``{dataset}-{split}.index.json``: what a cache holds and how to check it.

Written last and atomically, so a cache with a manifest is complete. Readers refuse another
``format`` or ``version`` with an error naming the expected value. Until then featurize keeps a
progress file ``{dataset}-{split}.progress.json`` beside the shards; a reader that finds one (or
shards) but no manifest says the featurize run is unfinished and how to finish it.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bombkd_io.atomic import atomic_path
from bombkd_io.errors import DatasetError, FormatError
from bombkd_io.sampling import shard_ranges
from bombkd_io.shards.codec import DTYPES

FORMAT_NAME = "bombkd-features"
FORMAT_VERSION = 1
MANIFEST_SUFFIX = ".index.json"
PROGRESS_SUFFIX = ".progress.json"  # featurize's record of an unfinished run (bombkd_train)
NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")  # model (role) names and keys: no dots, no slashes
RESERVED_MODELS = ("cls", "json")
# Sanity bounds on what a manifest (possibly a stranger's) may ask a reader to allocate.
MAX_SHARD_BYTES = 64 << 30   # one shard file, and one shard's decoded features
MAX_SHARD_SIZE = 1 << 24     # samples per shard


@dataclass(frozen=True)
class ShardEntry:
    name: str    # file name, relative to the cache root
    count: int   # samples in the shard
    bytes: int   # file size
    sha256: str  # hex digest of the whole file


@dataclass
class ModelEntry:
    name: str      # role: "student" or a teacher name
    backbone: str  # registry name or hub id the features came from
    dim: int       # D
    tokens: int    # T' (after pooling)
    frames: int    # frames per clip fed to the backbone
    size: int      # clip side in pixels
    pooling: str
    dtype: str     # "float16" | "float32"
    shards: list[ShardEntry] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)


@dataclass
class Manifest:
    dataset: str
    split: str
    classes: list[str]
    shard_size: int
    models: dict[str, ModelEntry]          # role -> entry; "student" first, then teachers
    count: int                             # samples in every model's shard set
    failed: list[dict] = field(default_factory=list)  # [{"path", "reason"}] not in the cache
    labels: bool = True                    # student samples carry KEY.cls

    @property
    def teachers(self) -> list[str]:
        return [m for m in self.models if m != "student"]

    def model(self, name: str) -> ModelEntry:
        """The entry of model ``name``; else a ``DatasetError`` listing what the cache holds."""
        if name not in self.models:
            raise DatasetError(
                f"the {self.dataset}-{self.split} cache has no features for model {name!r}; "
                f"it holds {sorted(self.models)} (add it with `bombkd featurize --resume`)")
        return self.models[name]

    def to_json(self) -> dict:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "dataset": self.dataset,
                "split": self.split, "classes": list(self.classes), "shard_size": self.shard_size,
                "count": self.count, "labels": self.labels,
                "models": {name: _model_json(m) for name, m in self.models.items()},
                "failed": list(self.failed)}


def _model_json(m: ModelEntry) -> dict:
    out = asdict(m)
    del out["name"]  # the key of the "models" map
    return out


def manifest_path(root: str | Path, dataset: str, split: str) -> Path:
    return Path(root) / f"{dataset}-{split}{MANIFEST_SUFFIX}"


def progress_path(root: str | Path, dataset: str, split: str) -> Path:
    return Path(root) / f"{dataset}-{split}{PROGRESS_SUFFIX}"


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
    """Find and read ``{dataset}-{split}.index.json`` under ``root`` (any dataset if not given)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such cache directory (make one with `bombkd featurize`)")
    if dataset is not None:
        found = [manifest_path(root, dataset, split)]
        found = [p for p in found if p.is_file()]
    else:
        found = sorted(root.glob(f"*-{split}{MANIFEST_SUFFIX}"))
    if not found:
        raise DatasetError(_missing_message(root, split, dataset))
    if len(found) > 1:
        names = [p.name for p in found]
        raise DatasetError(f"{root}: several caches for split {split!r} ({names}); pass --dataset")
    return read_manifest(found[0])


def _missing_message(root: Path, split: str, dataset: str | None) -> str:
    wanted = f"{dataset or '<dataset>'}-{split}{MANIFEST_SUFFIX}"
    unfinished = _unfinished_message(root, split, dataset, wanted)
    if unfinished:
        return unfinished
    entries = sorted(p.name for p in root.iterdir())
    listing = ", ".join(entries[:20])
    if len(entries) > 20:
        listing += f", ... ({len(entries)} entries)"
    hint = "run `bombkd featurize` first"
    if any(n.startswith("features_") and (n.endswith(".index.json") or n.endswith(".pkl"))
           for n in entries):
        hint = "this looks like a TC-BombKD cache: convert it with `bombkd import-cache`"
    return f"{root}: no manifest {wanted}; the directory holds [{listing or 'nothing'}]; {hint}"


def _unfinished_message(root: Path, split: str, dataset: str | None, wanted: str) -> str | None:
    """What to do about a featurize run into ``root`` that has not written its manifest (it
    left a progress file or shards); None if there is no sign of one."""
    pattern = f"{dataset or '*'}-{split}"
    progress = sorted(root.glob(pattern + PROGRESS_SUFFIX))
    shards = sorted(root.glob(pattern + "-*.tar")) + sorted(root.glob(pattern + "-*.tar.tmp"))
    if not progress and not shards:
        return None
    found = (progress or shards)[0].name
    if not dataset and progress:
        dataset = found[:-len(f"-{split}{PROGRESS_SUFFIX}")]
    return (f"{root}: the featurize run into this folder is unfinished ({found} is there, the "
            f"manifest {wanted} is not); finish it with `bombkd featurize --dataset "
            f"{dataset or '<dataset>'} --split {split} --out {root} --resume` and the first "
            "run's other arguments (--root, --student, --teachers)")


def read_manifest(path: str | Path) -> Manifest:
    """Parse and check one manifest file; ``FormatError`` naming the file and the problem."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: not a readable JSON manifest ({exc}); bombkd writes it "
                          "last and atomically, so it was changed since: restore it, or "
                          "featurize again into a new --out") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise FormatError(f"{path}: format is {got!r}, expected {FORMAT_NAME!r}")
    if data.get("version") != FORMAT_VERSION:
        raise FormatError(f"{path}: {FORMAT_NAME} version {data.get('version')!r} is not "
                          f"supported; expected version {FORMAT_VERSION} (upgrade bombkd, or featurize "
                          "again into a new --out)")
    try:
        manifest = _from_json(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise FormatError(f"{path}: malformed manifest ({type(exc).__name__}: {exc})") from exc
    problems = check_manifest(manifest)
    if problems:
        raise FormatError(f"{path}: " + "; ".join(problems))
    return manifest


def _from_json(data: dict) -> Manifest:
    models = {}
    for name, m in data["models"].items():
        shards = [ShardEntry(str(s["name"]), int(s["count"]), int(s["bytes"]), str(s["sha256"]))
                  for s in m["shards"]]
        models[name] = ModelEntry(name, str(m["backbone"]), int(m["dim"]), int(m["tokens"]),
                                  int(m["frames"]), int(m["size"]), str(m["pooling"]),
                                  str(m["dtype"]), shards)
    failed = [{"path": str(f["path"]), "reason": str(f["reason"])} for f in data.get("failed", [])]
    return Manifest(str(data["dataset"]), str(data["split"]), [str(c) for c in data["classes"]],
                    int(data["shard_size"]), models, int(data["count"]), failed,
                    bool(data.get("labels", True)))


def check_manifest(m: Manifest) -> list[str]:
    """Every inconsistency at once: names, dtypes, and shard k of every model covering
    samples ``[k*S, (k+1)*S)`` (the epoch order relies on it)."""
    problems = []
    if not 1 <= m.shard_size <= MAX_SHARD_SIZE:
        problems.append(f"shard_size must be in [1, {MAX_SHARD_SIZE}], got {m.shard_size}")
        return problems
    expected = [len(r) for r in shard_ranges(m.count, m.shard_size)]
    if "student" not in m.models:
        problems.append(f"no 'student' model (models: {sorted(m.models)})")
    for name, entry in m.models.items():
        if not NAME_RE.match(name) or name in RESERVED_MODELS:
            problems.append(f"model name {name!r} must match {NAME_RE.pattern} and not be "
                            f"{RESERVED_MODELS}")
        if entry.dtype not in DTYPES:
            problems.append(f"model {name}: dtype {entry.dtype!r} not in {sorted(DTYPES)}")
        counts = [s.count for s in entry.shards]
        if counts != expected:
            problems.append(f"model {name}: shard counts {counts} do not split count={m.count} "
                            f"into shards of {m.shard_size} ({expected})")
        problems += _size_problems(name, entry, m.shard_size)
    return problems


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
    """A human summary: dataset, counts, each model's shape, dtype and bytes, failed videos."""
    where = f" in {root}" if root is not None else ""
    lines = [f"{m.dataset}-{m.split}{where}: {FORMAT_NAME} v{FORMAT_VERSION}, {m.count} samples, "
             f"{len(m.classes)} classes, shards of {m.shard_size}, labels: "
             f"{'yes' if m.labels else 'no'}"]
    for name, e in m.models.items():
        lines.append(f"  {name:<12} {e.backbone:<24} [{e.tokens}, {e.dim}] {e.dtype:<8} "
                     f"{len(e.shards)} shards, {e.count} samples, {e.bytes / 1e6:.1f} MB "
                     f"(frames {e.frames}, size {e.size}, pooling {e.pooling})")
    total = sum(e.bytes for e in m.models.values())
    lines.append(f"  total {total / 1e6:.1f} MB; failed videos: {len(m.failed)}")
    lines += [f"    {f['path']}: {f['reason']}" for f in m.failed[:20]]
    if len(m.failed) > 20:
        lines.append(f"    ... and {len(m.failed) - 20} more")
    return "\n".join(lines)
