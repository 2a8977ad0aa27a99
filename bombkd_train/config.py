"""Every typed config of bombkd_train, one per command, checked before any I/O.

``DataConfig`` says where batches come from (either loader); ``TrainConfig`` and ``EvalConfig``
nest one. ``problems()`` lists every bad argument by its CLI flag, ``validate()`` raises them all
at once. One name per idea: ``batch_size``, ``pooling``, ``decode_threads`` (featurize's decoder
threads) vs ``loader_workers`` (DataLoader processes: they only read ahead, they never change
the epoch plan); every ``device`` is read by ``bombkd_io.video.route.parse_device``.
``cache_contradictions`` is what a run's settings contradict in a feature cache it reads or adds
to.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from bombkd_io.atomic import folder_problem
from bombkd_io.datasets import DATASETS
from bombkd_io.errors import ConfigError, ErrorPolicy
from bombkd_io.names import name_problem, role_name
from bombkd_io.storage import check_root, is_remote
from bombkd_io.sampling import DEFAULT_SHARD_SIZE
from bombkd_io.shards.codec import DTYPES
from bombkd_io.shards.cache import parse_size
from bombkd_io.shards.manifest import ModelEntry
from bombkd_io.video.route import is_cuda, parse_device
from bombkd_train.backbones import POOLS, check_backbone_name

LOADERS = ("dali", "wds")
FORMATS = ("wds",)
CONVERTER_KINDS = ("linear", "mlp")


class _Checked:
    """``validate()`` for a config that lists its ``problems()``."""

    def problems(self) -> list[str]:
        raise NotImplementedError

    def validate(self) -> None:
        """Every bad argument at once, before any I/O."""
        if problems := self.problems():
            raise ConfigError(problems)


def _device_problems(device: str) -> list[str]:
    """Why ``--device`` names no device of this machine (``parse_device``'s rule), or []."""
    if problems := _raised(parse_device, device):
        return problems
    if is_cuda(device) and not torch.cuda.is_available():
        return [f"--device {device}: CUDA is not available on this machine; use --device cpu"]
    return []


def cache_contradictions(student: ModelEntry, shard_size: int, wanted_shard_size: int | None,
                         **wanted) -> dict[str, tuple]:
    """What a run's settings contradict in a feature cache: the fields of its ``student`` entry
    (``ModelEntry.contradictions``) and its ``shard_size``, as ``field -> (recorded, wanted)``;
    ``None`` takes what the cache holds. Reading a cache (``data.py``) and adding to one
    (``featurize/state.py``) both refuse a run on it."""
    found = student.contradictions(**wanted)
    if wanted_shard_size not in (None, shard_size):
        found["shard_size"] = (shard_size, wanted_shard_size)
    return found


def pinned(teacher: str) -> tuple[str, str | None]:
    """``NAME@REV`` -> (NAME, REV): a teacher at a hub revision; ``NAME`` -> (NAME, None). An
    ``@`` followed by a path (``/data/m@2/x``) is part of a folder name, not a revision."""
    name, at, rev = teacher.rpartition("@")
    return (name, rev or None) if at and name and "/" not in rev else (teacher, None)


def _revision_problems(revision: str | None) -> list[str]:
    """An empty ``--revision`` (None: the default branch, or the cache's)."""
    if revision == "":
        return ["--revision: empty; name a branch, tag or commit, or leave it out"]
    return []


def _raised(check, *args) -> list[str]:
    """The problems of the ``ConfigError`` that ``check(*args)`` raises ([] if it raises none)."""
    try:
        check(*args)
    except ConfigError as err:
        return err.problems
    return []


def _at_least(minimum: int, *named: tuple[str, float | None]) -> list[str]:
    """``FLAG VALUE: must be >= minimum`` for each ``(flag, value)`` below it (None: not set)."""
    return [f"{flag} {value}: must be >= {minimum}" for flag, value in named
            if value is not None and value < minimum]


def _one_of(flag: str, value, choices) -> list[str]:
    return [] if value in choices else [f"{flag} {value!r}: expected one of {list(choices)}"]


def _folder(folder: str | None, argument: str) -> list[str]:
    return [problem] if (problem := folder_problem(folder, argument)) else []


def _run_problems(teachers: list[str], lr: float, save_dir: str) -> list[str]:
    """What a command that trains into ``--save-dir`` checks of its common arguments."""
    problems = [] if teachers else ["--teachers: name at least one teacher (comma-separated)"]
    problems += [] if lr > 0 else [f"--lr {lr}: must be > 0"]
    return problems + _folder(save_dir, "--save-dir")


@dataclass
class DataConfig(_Checked):
    """Where the features come from. ``None`` means: what the cache records, else the default."""

    loader: str                   # "wds" (cached features) | "dali" (videos)
    root: str                     # wds: the feature cache; dali: the dataset root
    dataset: str | None = None    # dali: required; wds: picks one of several caches in root
    student: str | None = None    # dali: required; wds: checked against the cache's student
    frames: int | None = None     # dali: default 16 (or the cache's)
    size: int | None = None       # dali: default the backbone's (or the cache's)
    pooling: str | None = None    # dali: default "time" (or the cache's)
    batch_size: int = 8
    loader_workers: int = 0       # DataLoader processes (they only read ahead)
    seed: int = 0                 # the epoch plan's (and the trainer's initial weights)
    shard_size: int | None = None  # dali: the cache's, else DEFAULT_SHARD_SIZE; wds: checked
    cache: str | None = None       # dali: a feature cache whose plan and student settings to replay
    device: str = "auto"
    on_error: str = "raise"        # wds: a corrupt shard stops the run ("raise") or is skipped
    revision: str | None = None    # dali: the student's hub revision (default: the cache's)
    shard_cache: str | None = None  # wds, remote root: local folder keeping its shards
    shard_cache_limit: str | None = None  # most bytes it keeps ("50G"); None: no limit

    def problems(self) -> list[str]:
        out = _one_of("--loader", self.loader, LOADERS)
        out += _raised(check_root, self.root, "--root") if self.loader == "wds" else []
        if self.shard_cache_limit is not None:
            out += (_raised(parse_size, self.shard_cache_limit) if self.shard_cache else
                    ["--shard-cache-limit: needs --shard-cache (the folder it limits)"])
        out += _folder(self.shard_cache, "--shard-cache")
        if self.loader == "dali" and not self.dataset:
            out.append(f"--dataset: required with --loader dali ({', '.join(DATASETS)})")
        if self.loader == "dali" and not self.student:
            out.append("--student: required with --loader dali")
        if self.pooling is not None:
            out += _one_of("--pool", self.pooling, POOLS)
        out += _raised(ErrorPolicy, self.on_error, "--on-error")
        out += _at_least(1, ("--batch", self.batch_size), ("--shard-size", self.shard_size),
                         ("--frames", self.frames), ("--size", self.size))
        out += _at_least(0, ("--workers", self.loader_workers))
        return out + _revision_problems(self.revision) + _device_problems(self.device)


@dataclass
class TrainConfig(_Checked):
    """``bombkd train``: the fusion head on ``data``'s batches of ``split``."""

    data: DataConfig
    split: str
    teachers: list[str]
    converters: str
    classes: int | None = None    # None: the split's class count (the cache's or the dataset's)
    epochs: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    gate_l1: float = 1e-3
    fusion_rank: int = 64
    save_dir: str = "runs/fusion"
    resume: bool = False          # continue from the newest valid checkpoint in save_dir
    val_split: str | None = None
    save_every: int | None = None             # a step checkpoint every N steps
    save_every_minutes: float | None = None   # ... and/or every M minutes
    keep: int = 2                 # step checkpoints kept (besides the epoch ones)
    progress: bool = True

    def problems(self) -> list[str]:
        out = self.data.problems() + _run_problems(self.teachers, self.lr, self.save_dir)
        out += _at_least(1, ("--classes", self.classes), ("--epochs", self.epochs),
                         ("--fusion-rank", self.fusion_rank), ("--save-every", self.save_every),
                         ("--keep", self.keep))
        if self.save_every_minutes is not None and not self.save_every_minutes > 0:
            out.append(f"--save-every-minutes {self.save_every_minutes}: must be > 0")
        return out + _at_least(0, ("--gate-l1", self.gate_l1))


@dataclass
class EvalConfig(_Checked):
    """``bombkd eval``: a fusion checkpoint on a split, through either loader."""

    data: DataConfig
    split: str
    fusion: str
    converters: str | None = None   # default: the converters the run was trained with
    out: str | None = None          # default: the checkpoint's folder / eval-{split}
    progress: bool = True

    def problems(self) -> list[str]:
        # --student may be left out: it defaults to the one the head was trained on (--fusion)
        data = replace(self.data, student=self.data.student or "<the --fusion checkpoint's>")
        return data.problems() + _folder(self.out, "--out")


@dataclass
class FeaturizeConfig(_Checked):
    """``bombkd featurize``: videos -> the student's and every teacher's shard set in ``out``."""

    dataset: str
    root: str
    split: str
    student: str
    out: str
    teachers: list[str] = field(default_factory=list)  # backbone names; the role is the name
    format: str = "wds"
    shard_size: int = DEFAULT_SHARD_SIZE
    dtype: str = "float16"
    frames: int | None = 16      # student clip length (None: the model's own); teachers: their own
    size: int | None = None      # student clip side (None: the model's own)
    batch_size: int = 8
    decode_threads: int = 4
    pooling: str = "time"
    device: str = "auto"          # cuda where there is a GPU, else cpu
    resume: bool = False
    strict: bool = False         # videos decoded with warnings are left out (failed), not cached
    revision: str | None = None  # the student's hub revision (None: the default branch)
    progress: bool = True
    rank: int = 0                # this process writes shards k with k % world_size == rank
    world_size: int = 1          # processes writing the cache together (torchrun or a job array)

    def problems(self) -> list[str]:
        p = [f"--{name} is required" for name in ("dataset", "root", "split", "student", "out")
             if not getattr(self, name)]
        p += _revision_problems(self.revision)
        if self.split and (problem := name_problem(self.split, "split")):
            p.append(f"--split: {problem}")
        if self.dataset:
            p += _one_of("--dataset", self.dataset, DATASETS)
        p += (_one_of("--format", self.format, FORMATS) + _one_of("--dtype", self.dtype, DTYPES)
              + _one_of("--pool", self.pooling, POOLS))
        p += _at_least(1, ("--shard-size", self.shard_size), ("--batch", self.batch_size),
                       ("--workers", self.decode_threads), ("--frames", self.frames),
                       ("--size", self.size), ("--world-size", self.world_size))
        if not 0 <= self.rank < max(self.world_size, 1):
            p.append(f"--rank {self.rank}: must be in 0 .. --world-size - 1 "
                     f"({self.world_size - 1}); ranks are numbered from 0")
        p += _device_problems(self.device)
        names = [self.student, *(pinned(t)[0] for t in self.teachers)]
        p += [problem for name in names if name and (problem := check_backbone_name(name))]
        roles = [role_name(name) for name in names[1:]]
        for role in sorted({r for r in roles if roles.count(r) > 1 or r == "student"}):
            p.append(f"--teachers: {role!r} is given twice or clashes with 'student'; "
                     "each teacher needs a distinct name")
        if self.root and not Path(self.root).exists():
            p.append(f"--root {self.root}: no such directory")
        if is_remote(self.out):  # written through a local staging folder (shards.publish)
            return p + _raised(functools.partial(check_root, write=True), self.out, "--out")
        return p + _folder(self.out or None, "--out") + _raised(check_root, self.out, "--out")

    def roles(self) -> dict[str, str]:
        """role -> backbone name: "student" and one role per teacher."""
        return {"student": self.student,
                **{role_name(name): name for name, _ in map(pinned, self.teachers)}}

    def revisions(self) -> dict[str, str | None]:
        """role -> the hub revision asked for (``--revision``; ``NAME@REV`` for a teacher)."""
        return {"student": self.revision,
                **{role_name(name): rev for name, rev in map(pinned, self.teachers)}}


@dataclass
class ConverterTrainConfig(_Checked):
    """``bombkd train-converters``: one converter per teacher from cached student->teacher pairs.

    Its data is always a feature cache read with the student and every teacher, so it keeps the
    few settings that reader takes instead of nesting a ``DataConfig``."""

    root: str
    split: str
    teachers: list[str]
    save_dir: str
    epochs: int = 5
    kind: str = "linear"
    val_frac: float = 0.1
    lr: float = 1e-3
    batch_size: int = 32
    seed: int = 0
    dataset: str | None = None
    loader_workers: int = 0
    hidden: int = 0
    device: str = "auto"
    progress: bool = True

    def problems(self) -> list[str]:
        out = _run_problems(self.teachers, self.lr, self.save_dir)
        out += _one_of("--kind", self.kind, CONVERTER_KINDS)
        if not 0.0 <= self.val_frac < 1.0:
            out.append(f"--val-frac {self.val_frac}: must be in [0, 1)")
        out += _at_least(1, ("--batch", self.batch_size))
        out += _at_least(0, ("--epochs", self.epochs), ("--workers", self.loader_workers))
        return out + _device_problems(self.device)


@dataclass
class DemoConfig(_Checked):
    """``bombkd demo``: sample data, featurize, converters, both loaders, eval, a report."""

    out: str = "bombkd-demo"
    classes: int = 6
    per_class: int = 20
    codec: str = "vp9"
    seed: int = 0
    student: str = "tiny-vjepa2"
    teachers: list[str] = field(
        default_factory=lambda: ["tiny-videomae", "tiny-timesformer", "tiny-vivit"])
    frames: int = 16
    shard_size: int = 16
    fp16: bool = True
    batch_size: int = 8
    epochs: int = 8
    lr: float = 3e-3
    converter_epochs: int = 3
    loader_workers: int = 0
    device: str = "auto"          # cuda where there is a GPU, else cpu
    progress: bool = True

    def problems(self) -> list[str]:
        out = _at_least(1, ("--classes", self.classes), ("--per-class", self.per_class),
                        ("--batch", self.batch_size), ("--epochs", self.epochs))
        return out + _device_problems(self.device)
