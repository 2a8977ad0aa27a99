"""featurize's bookkeeping: what ``--out`` already holds for a run, checked against its config,
shard by shard, and the progress file that an unfinished run leaves.

What an output directory can hold for one (dataset, split):
- nothing: a fresh run;
- ``{dataset}-{split}.index.json``: a finished cache; a new teacher is added to it, ``--resume``
  checks every shard (count, sha256) and redoes the ones that do not verify;
- ``{dataset}-{split}.progress.json``: an unfinished run (written after every shard); only
  ``--resume`` continues it;
- ``{dataset}-{split}.rank{R}.progress.json``: the same for rank R of a run split over several
  processes (``ranks.py``); each rank writes its own, and a run reads them all (``merge``).
A cache made with another student, pooling, dtype or shard size is refused, never overwritten;
so is a model whose weights, normalisation or clip differ from what the cache records of it
(``fill_model``).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bombkd_io.atomic import atomic_path, remove_temps
from bombkd_io.datasets import VideoIndex
from bombkd_io.errors import ConfigError, DatasetError, FormatError
from bombkd_io.names import check_name, locate
from bombkd_io.shards.manifest import (Manifest, ModelEntry, ShardEntry, manifest_path,
                                       misnamed_shard, progress_path, rank_progress_paths,
                                       read_manifest)
from bombkd_io.shards.verify import verify_shard
from bombkd_io.shards.writer import remove_temp_shards
from bombkd_train.backbones import Backbone
from bombkd_train.config import FeaturizeConfig, cache_contradictions

PROGRESS_FORMAT = "bombkd-featurize-progress"


@dataclass
class CacheState:
    """What the cache holds (or will hold) for one (dataset, split), shard by shard."""
    config: FeaturizeConfig
    index: VideoIndex
    models: dict[str, ModelEntry]                 # role -> entry; "student" first
    done: dict[str, dict[int, ShardEntry]]        # role -> shard k -> finished shard
    layout: list[int] = field(default_factory=list)  # samples in each known shard
    final: bool = False                           # layout complete (a manifest was written)
    failed: dict[int, dict] = field(default_factory=dict)  # index pos -> {"path", "reason"}
    ok: list[int] | None = None                   # ok pos -> index pos, after probing
    # index pos -> {"path", "reason"}: cached, but decoded with warnings (health.py)
    suspect: dict[int, dict] = field(default_factory=dict)
    # role -> shard k -> index pos it was started from (the plan of ranks.shard_plan then);
    # absent for shards written in index order (a manifest's, a one-process run's)
    starts: dict[str, dict[int, int]] = field(default_factory=dict)

    @property
    def progress_path(self) -> Path:
        return progress_path(self.config.out, self.config.dataset, self.config.split)

    def all_roles(self) -> list[str]:
        return list(self.models)

    def roles_to_run(self, config: FeaturizeConfig) -> list[str]:
        """Roles with shards missing (``--resume`` may find more when it verifies)."""
        return [r for r in self.roles_to_check(config)
                if not self.final or len(self.done.get(r, {})) < len(self.layout)]

    def roles_to_check(self, config: FeaturizeConfig) -> list[str]:
        """An unfinished run: all its roles. A finished cache: the roles this run names, and
        any a previous run left incomplete (an interrupted teacher addition)."""
        if not self.final:
            return self.all_roles()
        unfinished = [r for r in self.models if len(self.done.get(r, {})) < len(self.layout)]
        return [r for r in self.models if r in config.roles() or r in unfinished]

    def is_failed(self, index_pos: int) -> bool:
        return index_pos in self.failed

    def add_failure(self, index_pos: int, reason: str) -> None:
        self.failed[index_pos] = {"path": self.index.items[index_pos].path, "reason": reason}

    def add_suspect(self, index_pos: int, reasons: list[str]) -> None:
        """Record (or add to) what looked wrong when this video was read or decoded."""
        entry = self.suspect.setdefault(index_pos, {"path": self.index.items[index_pos].path,
                                                    "reason": ""})
        new = [r for r in dict.fromkeys(reasons) if r not in entry["reason"]]
        entry["reason"] = "; ".join(([entry["reason"]] if entry["reason"] else []) + new)

    def record_shard(self, role: str, k: int, entry: ShardEntry, start: int) -> None:
        self.done.setdefault(role, {})[k] = entry
        self.starts.setdefault(role, {})[k] = start

    def merge(self, other: CacheState, out: Path) -> None:
        """Add what another process's record holds: its models' shapes, finished shards (where
        both name one, the one the file on disk matches), failed and suspect videos."""
        for role, entry in other.models.items():
            if role not in self.models or not self.models[role].dim:
                self.models[role] = entry
        for role, shards in other.done.items():
            for k, entry in shards.items():
                have = self.done.get(role, {}).get(k)
                if have is None or (have != entry and not verify_shard(
                        locate(str(out), have.name), have)):
                    self.done.setdefault(role, {})[k] = entry
                    start = other.starts.get(role, {}).get(k)
                    if start is None:
                        self.starts.get(role, {}).pop(k, None)
                    else:
                        self.starts.setdefault(role, {})[k] = start
        for i, f in other.failed.items():
            self.failed.setdefault(i, f)
        for i, s in other.suspect.items():
            self.suspect.setdefault(i, s)

    def set_probe(self, ok: list[int], probe_failed: list[tuple[str, str]],
                  probe_warned: list[tuple[str, list[str]]] = ()) -> None:
        """Record unreadable videos; refuse if one the cache holds became unreadable.

        ``probe_warned``: (path, warnings) of videos that probed with warnings: suspect, or
        with ``--strict`` failed, unless the cache already holds them."""
        position = {item.path: i for i, item in enumerate(self.index.items)}
        new = [(position[p], why) for p, why in probe_failed if position[p] not in self.failed]
        last = self._last_cached(ok, [i for i, _ in new])
        if new and self.layout:
            for i, why in new:
                if i <= last or self.final:
                    raise DatasetError(f"{self.index.items[i].path}: readable when the cache in "
                                       f"{self.config.out} was written, unreadable now ({why}); "
                                       "featurize into a new --out")
        for i, why in new:
            self.add_failure(i, why)
        self.ok = ok
        for path, reasons in probe_warned:
            self.flag(position[path], reasons, cached=self.final or position[path] <= last)

    def flag(self, index_pos: int, reasons: list[str], *, cached: bool) -> None:
        """A video read or decoded with warnings: suspect; with ``--strict`` failed, unless the
        cache already holds it (``cached``: its layout is fixed)."""
        if self.is_failed(index_pos):
            return
        if self.config.strict and not cached:
            self.add_failure(index_pos, "suspect, left out by --strict: " + "; ".join(reasons))
        else:
            self.add_suspect(index_pos, reasons)

    def _last_cached(self, ok: list[int], newly_failed: list[int]) -> int:
        """Index position of the last video the known shards hold (-1: none, or not known)."""
        count = sum(self.layout)
        kept = [i for i in sorted(set(ok) | set(newly_failed)) if i not in self.failed]
        return kept[count - 1] if 0 < count <= len(kept) else -1

    def fill_model(self, role: str, bb: Backbone) -> None:
        """Take the shape and the record (weights, dtype, normalisation, version) from the
        backbone; refuse, naming each difference, if the role has shards made otherwise."""
        entry = self.models[role]
        shape = {"dim": bb.dim, "tokens": bb.tokens, "frames": bb.frames, "size": bb.size}
        record = bb.record()
        if not self.done.get(role):
            self.models[role] = replace(entry, **shape, **record)
            return
        # the revision asked for was checked before loading; the weights it gave are compared
        compared = {k: v for k, v in record.items() if k not in ("revision", "bombkd")}
        found = entry.contradictions(**shape, **compared)
        if found:
            raise ConfigError([f"{role} ({entry.backbone}): {key} is {have!r} in the cache in "
                               f"{self.config.out}, {want!r} now" for key, (have, want)
                               in found.items()] +
                              ["its shards were made otherwise: featurize into a new --out"])
        self.models[role] = replace(entry, **shape)  # the record stays the shards' own

    def manifest(self) -> Manifest:
        models = {role: replace(e, shards=[self.done[role][k] for k in range(len(self.layout))])
                  for role, e in self.models.items()}
        return Manifest(self.config.dataset, self.config.split, list(self.index.classes),
                        self.config.shard_size, models, sum(self.layout),
                        [self.failed[i] for i in sorted(self.failed)],
                        labels=self.index.labelled,
                        suspect=[self.suspect[i] for i in sorted(self.suspect)
                                 if i not in self.failed])

    def drop_progress(self) -> None:
        """Remove the progress files of every process (the manifest is written)."""
        out, ds, split = self.config.out, self.config.dataset, self.config.split
        for path in [self.progress_path, *rank_progress_paths(out, ds, split).values()]:
            path.unlink(missing_ok=True)


def load_state(config: FeaturizeConfig, index: VideoIndex, *, dry_run: bool = False) -> CacheState:
    """What ``config.out`` holds for this (dataset, split), checked against ``config``: every
    progress record merged (all ranks'), else the manifest, else nothing."""
    out, ds, split = Path(config.out), config.dataset, config.split
    manifest = manifest_path(out, ds, split)
    records = [p for p in [progress_path(out, ds, split),
                           *rank_progress_paths(out, ds, split).values()] if p.is_file()]
    if config.world_size > 1 and not (config.resume or dry_run):
        # the other ranks' records are this run's, written while it starts (a job array's
        # tasks start when the scheduler lets them): only a record of this rank's is refused
        records = [p for p in records if p.name == progress_path(out, ds, split,
                                                                   config.rank).name
                   or p.name == progress_path(out, ds, split).name]
    if records:
        if not (config.resume or dry_run):
            raise ConfigError(f"{records[0]}: an unfinished featurize run; pass --resume to "
                              "finish it, or choose another --out")
        state = _read_progress(records[0], config, index)
        for path in records[1:]:
            state.merge(_read_progress(path, config, index), out)
    elif manifest.is_file():
        state = _from_manifest(read_manifest(manifest), config, index)
    else:
        stray = [p for p in sorted(out.glob(f"{ds}-{split}-*.tar*")) if out.is_dir()
                 and _owned(p.name, config)]
        if stray and not (config.resume or dry_run):
            raise ConfigError(f"{out} holds shard files of an unfinished run ({stray[0].name}, "
                              "...) but no manifest; pass --resume to redo them, or choose "
                              "another --out")
        state = CacheState(config, index, {}, {})
    _check_compatible(state, config, index)
    revisions = config.revisions()
    for role, name in config.roles().items():
        if role not in state.models:
            own = role == "student"
            state.models[role] = ModelEntry(role, name, 0, 0, (config.frames or 0) if own else 0,
                                            (config.size or 0) if own else 0, config.pooling,
                                            config.dtype, revision=revisions[role])
    student = state.models["student"]
    if student.revision is None and config.revision:  # a cache that did not record one
        state.models["student"] = replace(student, revision=config.revision)
    return state


def _owned(name: str, config: FeaturizeConfig) -> bool:
    """Whether shard file ``name`` (``...-{k:06d}.tar[.tmp]``) is this rank's to write."""
    number = name.split(".")[0].rsplit("-", 1)[-1]
    return not number.isdigit() or int(number) % config.world_size == config.rank


def _check_compatible(state: CacheState, config: FeaturizeConfig, index: VideoIndex) -> None:
    if not state.models:
        return
    where, problems = f"{config.out} holds a {config.dataset}-{config.split} cache", []
    for key, (have, want) in cache_contradictions(
            state.models["student"], state.config.shard_size, config.shard_size,
            backbone=config.student, pooling=config.pooling, dtype=config.dtype,
            frames=config.frames, size=config.size, revision=config.revision).items():
        what = "shard size" if key == "shard_size" else f"student {key}"
        problems.append(f"{what} is {have!r} there, this run asks for {want!r}")
    if list(state.index.classes) != list(index.classes):
        problems.append("its class list differs from the dataset's")
    revisions = config.revisions()
    for role, name in config.roles().items():
        entry = state.models.get(role)
        if role != "student" and entry and entry.contradictions(
                backbone=name, pooling=config.pooling, dtype=config.dtype,
                revision=revisions[role]):
            problems.append(f"teacher {role!r} there is {entry.backbone} "
                            f"({entry.pooling}, {entry.dtype}, revision {entry.revision})")
    if problems:
        raise ConfigError([f"{where} that does not match: {p}" for p in problems] +
                          ["use another --out (nothing was changed)"])


def _from_manifest(m: Manifest, config: FeaturizeConfig, index: VideoIndex) -> CacheState:
    position = {item.path: i for i, item in enumerate(index.items)}
    missing = [f["path"] for f in m.failed if f["path"] not in position]
    if missing:
        raise DatasetError(f"{manifest_path(config.out, m.dataset, m.split)} lists {missing[0]}, "
                           "which is not in the dataset any more; featurize into a new --out")
    old = replace(config, shard_size=m.shard_size)
    old_index = replace(index, classes=list(m.classes))
    models = {role: replace(e, shards=[]) for role, e in m.models.items()}
    done = {role: dict(enumerate(e.shards)) for role, e in m.models.items()}
    suspect = {position[s["path"]]: dict(s) for s in m.suspect if s["path"] in position}
    return CacheState(old, old_index, models, done,
                      [s.count for s in m.models["student"].shards], True,
                      {position[f["path"]]: dict(f) for f in m.failed}, suspect=suspect)


def save_progress(state: CacheState, out: Path) -> None:
    """Atomically record the finished shards, so ``--resume`` can check and keep them (each
    rank of a run over several processes in its own file)."""
    models = {role: {**e.to_json(shards={str(k): asdict(s)
                                         for k, s in state.done.get(role, {}).items()}),
                     "starts": {str(k): i for k, i in state.starts.get(role, {}).items()}}
              for role, e in state.models.items()}
    rank = state.config.rank if state.config.world_size > 1 else None
    data = {"format": PROGRESS_FORMAT, "version": 1, "dataset": state.config.dataset,
            "split": state.config.split, "classes": list(state.index.classes),
            "shard_size": state.config.shard_size, "final": state.final, "layout": state.layout,
            "failed": [{"index": i, **f} for i, f in sorted(state.failed.items())],
            "suspect": [{"index": i, **s} for i, s in sorted(state.suspect.items())],
            "models": models}
    with atomic_path(progress_path(out, state.config.dataset, state.config.split, rank)) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _read_progress(path: Path, config: FeaturizeConfig, index: VideoIndex) -> CacheState:
    """The progress file of an unfinished run; its names must be the ones this run would write
    (it may be a stranger's: nothing in it becomes a path unchecked)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != PROGRESS_FORMAT or data.get("version") != 1:
            raise FormatError(f"{path}: not a {PROGRESS_FORMAT} version 1 file")
        if (data["dataset"], data["split"]) != (config.dataset, config.split):
            raise FormatError(f"{path}: is for {data['dataset']!r}-{data['split']!r}, not "
                              f"{config.dataset}-{config.split}")
        models, done, starts = {}, {}, {}
        for role, m in data["models"].items():
            check_name(role, "model", where=path)
            models[role] = ModelEntry.from_json(role, m)
            done[role] = {int(k): ShardEntry.from_json(s) for k, s in m["shards"].items()}
            starts[role] = {int(k): int(i) for k, i in m.get("starts", {}).items()}
            if problem := misnamed_shard(config.dataset, config.split, role, done[role].items()):
                raise FormatError(f"{path}: {problem}")
        failed = {int(f["index"]): {"path": f["path"], "reason": f["reason"]}
                  for f in data["failed"]}
        suspect = {int(s["index"]): {"path": s["path"], "reason": s["reason"]}
                   for s in data.get("suspect", [])}  # absent from older progress files
        old = replace(config, shard_size=int(data["shard_size"]))
        return CacheState(old, replace(index, classes=list(data["classes"])), models, done,
                          [int(c) for c in data["layout"]], bool(data["final"]), failed,
                          suspect=suspect, starts=starts)
    except FormatError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise FormatError(f"{path}: unreadable progress file ({type(exc).__name__}: {exc}); "
                          "delete it and the shards beside it to start over") from exc


def remove_stale_temps(out: Path, dataset: str, split: str, roles: list[str]) -> None:
    """Temp files a killed run left of what this run owns: the shards of ``roles``, the
    manifest and the progress file of (dataset, split); never anything else. Only while holding
    the lock on ``out`` for (dataset, split)."""
    for role in roles:
        remove_temp_shards(out, dataset, split, role)
    remove_temps(out, [manifest_path(out, dataset, split).name,
                       progress_path(out, dataset, split).name,
                       progress_path(out, dataset, split, 0).name.replace(".rank0.", ".rank*.")])
