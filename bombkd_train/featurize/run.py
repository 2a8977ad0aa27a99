"""The featurize run: videos -> clips -> every backbone -> one shard set per model (cache format 1).

The stages, in order (each clip is decoded once per distinct (frames, size) the models need,
and the student and every teacher run on that one decode):

    index_dataset        VideoIndex, items in split order
    probe_index          the decodable items (the "ok list"); unreadable ones are recorded
    shard plan           shard k starts where shard k-1 ended and takes S decoded samples
    ClipLoader.batches   uint8 clips per need, decoded in a background thread, with warnings
    Backbone             features [B, T', D] per model
    ShardSetWriter       shard k of every model: same samples, order and keys
    progress / manifest  the progress file after every shard; the manifest last, atomically

Shard k of a run is a pure function of where it starts: its batches are consecutive chunks of
``batch_size`` from that position (one more round per failed video), so a shard can be redone
alone (``--resume``, or a teacher added later) and comes out byte-identical.

A video that probes or decodes with warnings (libav messages, fewer frames than its header
claims, frames repeated although others were asked for: ``bombkd_io.video.health``) is cached
and listed in the manifest's ``suspect``; with ``--strict`` it is left out and listed in
``failed`` instead (not in shards written before: their samples are fixed).
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from bombkd_io.datasets import VideoIndex, index_dataset, item_key
from bombkd_io.errors import DatasetError, VideoError
from bombkd_io.lock import lock_folder
from bombkd_io.names import locate
from bombkd_io.shards.manifest import Manifest, save_manifest
from bombkd_io.shards.publish import Remote, staged_out
from bombkd_io.shards.verify import verify_shard
from bombkd_io.shards.writer import ShardSetWriter
from bombkd_io.video import ClipLoader, parse_device, probe_index
from bombkd_train.backbones import Backbone, create_backbone
from bombkd_train.featurize.estimate import DiskEstimate, check_free_space, estimate_bytes
from bombkd_train.config import FeaturizeConfig
from bombkd_train.featurize.sample import student_members
from bombkd_train.featurize.state import CacheState, load_state, remove_stale_temps, save_progress
from bombkd_train.runtime import model_threads, parity_settings

Need = tuple[int, int]  # (frames, size) a backbone consumes


@dataclass
class FeaturizeStats:
    """Where the time went (seconds) and how much was done; filled in by ``featurize``."""
    clips: int = 0               # samples written (per model set)
    failed: int = 0              # videos skipped (probe + decode)
    shards: int = 0              # shard files written
    bytes: int = 0               # bytes written
    probe_s: float = 0.0
    decode_wait_s: float = 0.0   # time the main thread waited for decoded clips
    infer_s: dict[str, float] = field(default_factory=dict)  # per model
    write_s: float = 0.0         # encoding + tar writing + hashing
    total_s: float = 0.0
    threads: int = 0             # torch intra-op threads the models ran with
    failed_videos: list[dict] = field(default_factory=list)   # the manifest's {"path", "reason"}
    suspect_videos: list[dict] = field(default_factory=list)  # cached, decoded with warnings

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.total_s if self.total_s else 0.0

    def summary(self, out: str) -> str:
        """One line of counts and times, then the failed and suspect videos, a few by name."""
        suspect = f", {len(self.suspect_videos)} suspect" if self.suspect_videos else ""
        line = (f"featurized {self.clips} clips ({self.failed} failed{suspect}) in "
                f"{self.total_s:.1f}s ({self.clips_per_s:.1f} clips/s): {self.shards} shards, "
                f"{self.bytes / 1e6:.1f} MB in {out} (writing {self.write_s:.1f}s, "
                f"decode wait {self.decode_wait_s:.1f}s, models {sum(self.infer_s.values()):.1f}s)")
        named = _named("failed", self.failed_videos) + _named("suspect", self.suspect_videos)
        if not named:
            return line
        return "\n".join([line, *named, f"  all of them, with reasons: `bombkd inspect {out}`"])


def _named(what: str, videos: list[dict], shown: int = 3, width: int = 160) -> list[str]:
    """``what: path: reason`` for the first ``shown`` videos (long reasons cut), then a count."""
    lines = []
    for v in videos[:shown]:
        reason = v["reason"] if len(v["reason"]) <= width else v["reason"][:width - 3] + "..."
        lines.append(f"  {what}: {v['path']}: {reason}")
    if len(videos) > shown:
        lines.append(f"  ... and {len(videos) - shown} more {what}")
    return lines


def featurize(config: FeaturizeConfig, *, stats: FeaturizeStats | None = None) -> Manifest:
    """Write (or complete) the feature cache ``config`` describes; returns its manifest.

    A new teacher on an existing cache adds only its shard set; ``resume`` keeps the shards
    that verify and redoes the rest. Refuses a cache in ``out`` made with another student, and
    a second run into ``out`` for the same (dataset, split) while one is going.
    """
    stats = stats if stats is not None else FeaturizeStats()
    start = time.perf_counter()
    config.validate()
    config = replace(config, device=parse_device(config.device))  # torch's name for "auto", "gpu"
    index = index_dataset(config.dataset, config.root, config.split)
    # a remote --out: written into a local stage, each finished piece published (shards.publish)
    with staged_out(config.out, config.dataset, config.split) as (out, remote), \
            lock_folder(out, argument="--out", name=f"{config.dataset}-{config.split}"):
        # one run per (dataset, split) in --out; with the lock, temporary files are a killed run's
        config = replace(config, out=out)
        state = load_state(config, index)
        remove_stale_temps(Path(config.out), config.dataset, config.split, state.all_roles())
        # the backbones run as video mode's student does: full fp32, deterministic kernels
        with model_threads(config.device, config.decode_threads) as threads, parity_settings():
            stats.threads = threads
            manifest = _Run(config, index, state, stats, remote).execute()
    stats.total_s = time.perf_counter() - start
    return manifest


def estimate_featurize(config: FeaturizeConfig) -> DiskEstimate:
    """``--dry-run``: the bytes a run would write and the free space; writes nothing.

    Assumes every video that has not been probed yet decodes (probing reads every file).
    """
    config.validate()
    index = index_dataset(config.dataset, config.root, config.split)
    with staged_out(config.out, config.dataset, config.split) as (out, _):
        state = load_state(replace(config, out=out), index, dry_run=True)
    roles = state.roles_to_run(config) if not config.resume else list(config.roles())
    for role in roles:  # dims and token counts come from the models themselves
        entry = state.models[role]
        state.fill_model(role, create_backbone(entry.backbone, frames=entry.frames or None,
                                               size=entry.size or None, pool=entry.pooling,
                                               revision=entry.revision))
    return estimate_bytes(config, index, state, {role: state.models[role] for role in roles})


class _Run:
    """One featurize run: plan the shards, decode per need, run the models, write."""

    def __init__(self, config: FeaturizeConfig, index: VideoIndex, state: CacheState,
                 stats: FeaturizeStats, remote: Remote | None = None):
        self.config, self.index, self.state, self.stats = config, index, state, stats
        self.out = Path(config.out)
        self.remote = remote  # a remote --out: the stage's finished pieces go there
        self.labelled = index.labelled  # else the student's samples have no .cls

    def execute(self) -> Manifest:
        cfg, state = self.config, self.state
        if not state.roles_to_run(cfg) and not cfg.resume:
            return state.manifest()
        self._probe()
        try:
            self._write_shards()
        finally:
            for loader in self.loaders.values():  # decode threads and DALI pipelines
                loader.close()
        state.final = True
        manifest = state.manifest()
        path = save_manifest(manifest, self.out)
        if self.remote:
            self.remote.finish(path, state.progress_path)
        state.drop_progress()
        self.stats.failed = len(manifest.failed)
        self.stats.failed_videos, self.stats.suspect_videos = manifest.failed, manifest.suspect
        return manifest

    def _write_shards(self) -> None:
        """Every shard that is missing or (``--resume``) does not verify, then the new ones."""
        cfg, state = self.config, self.state
        todo = self._todo()
        run = {r for _, _, _, redo in todo for r in redo} | (
            set() if state.final else set(state.all_roles()))
        self.backbones = {r: self._backbone(r) for r in state.all_roles() if r in run}
        need = estimate_bytes(cfg, self.index, state, {r: state.models[r] for r in self.backbones})
        # a remote --out: the local stage holds one shard of each model at a time
        check_free_space(self.out, -(-need.total // max(1, need.shards)) if self.remote
                         else need.total)
        total = sum(count for _, _, count, _ in todo) + (0 if state.final else state.remaining())
        with tqdm(total=total, unit="clips", desc=f"featurize {cfg.dataset}-{cfg.split}",
                  disable=not cfg.progress, dynamic_ncols=True) as self.bar:
            for k, start, count, redo in todo:
                self._shard(k, start, count, redo, known=True)
            if not state.final:
                self._new_shards()

    def _probe(self) -> None:
        start = time.perf_counter()
        # the video package maps "cpu" / "cuda[:N]" to its decoder device itself
        self.ok, self.infos, failed = probe_index(  # ok pos -> index pos, and their infos
            self.index, range(len(self.index.items)), self.config.device,
            progress=self.config.progress)
        warned = [(info.path, list(info.warnings)) for info in self.infos if info.warnings]
        self.state.set_probe(self.ok, failed, warned)
        self.loaders: dict[Need, ClipLoader] = {}
        self.stats.probe_s = time.perf_counter() - start

    def _backbone(self, role: str) -> Backbone:
        entry = self.state.models[role]
        bb = create_backbone(entry.backbone, frames=entry.frames or None,
                             size=entry.size or None, pool=entry.pooling, device=self.config.device,
                             revision=entry.revision)
        self.state.fill_model(role, bb)
        return bb

    def _todo(self) -> list[tuple[int, int, int, list[str]]]:
        """Known shards with at least one model to (re)write: (k, start, count, roles).

        ``--resume`` verifies each existing shard (size, sha256, count) and redoes the bad ones."""
        state = self.state
        roles = state.roles_to_check(self.config)
        todo, starts = [], state.known_starts()
        for k, count in enumerate(state.layout):
            redo = [r for r in roles if self._needs_write(r, k)]
            if redo:
                todo.append((k, starts[k], count, redo))
        return todo

    def _needs_write(self, role: str, k: int) -> bool:
        entry = self.state.done.get(role, {}).get(k)
        if entry is None:
            return True
        if not self.config.resume:
            return False
        where = self.remote.root if self.remote else str(self.out)
        return not verify_shard(locate(where, entry.name), entry)

    def _new_shards(self) -> None:
        k, pos = len(self.state.layout), self.state.frontier()
        roles = self.state.all_roles()
        while pos < len(self.ok):
            pos, count = self._shard(k, pos, self.config.shard_size, roles, known=False)
            if count == 0:
                break
            k += 1

    def _shard(self, k: int, start: int, target: int, roles: list[str],
               known: bool) -> tuple[int, int]:
        """Fill shard k of ``roles`` from ok position ``start``; returns (end, samples).

        ``known``: the shard was written before, and must come out with the same samples."""
        cfg = self.config
        writers = {r: ShardSetWriter(self.out, cfg.dataset, cfg.split, r, cfg.shard_size,
                                     self.state.models[r].dtype, start_shard=k) for r in roles}
        pos, kept = start, 0
        try:
            while kept < target and pos < len(self.ok):
                want = min(target - kept, len(self.ok) - pos)
                chunks = [list(range(a, min(a + cfg.batch_size, pos + want)))
                          for a in range(pos, pos + want, cfg.batch_size)]
                for positions, clips, decoded in self._decode(chunks, roles, known):
                    self._infer_and_write(writers, positions, clips, decoded)
                    kept += len(positions)
                pos += want
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        if known and kept != target:
            raise DatasetError(f"shard {k} held {target} samples when the cache was written; "
                               f"the videos now give {kept} (the dataset changed: featurize "
                               f"into a new --out)")
        self._finish_shard(k, writers, kept)
        return pos, kept

    def _decode(self, chunks: list[list[int]], roles: list[str],
                known: bool) -> Iterator[tuple[list[int], dict[Need, torch.Tensor], dict]]:
        """Yields (ok positions decoded for every need, clips per need, and by pos the student
        clip's frame indices and ``decoded_by``)."""
        needs = sorted({self._need(r) for r in roles})
        streams = [self._loader(need).batches(chunks) for need in needs]
        try:
            yield from self._zip_needs(needs, streams, roles, known)
        finally:
            for stream in streams:  # joins the decode threads, also when a model fails
                stream.close()

    def _zip_needs(self, needs: list[Need], streams: list, roles: list[str], known: bool):
        while True:
            start = time.perf_counter()
            batches = [next(s, None) for s in streams]
            self.stats.decode_wait_s += time.perf_counter() - start
            if batches[0] is None:
                return
            failed = {}
            for batch in batches:
                failed.update({p: why for p, why in batch.failed if p not in failed})
            for p, why in failed.items():
                self._record_failure(p, why, known)
            # decoded, but with signs of damage: suspect (--strict: failed, in a new shard)
            for p, reasons in _merged_warnings(batches).items():
                self.state.flag(self.ok[p], reasons, cached=known)
            common = set.intersection(*(set(b.positions) for b in batches))
            keep = [p for p in batches[0].positions
                    if p in common and not self.state.is_failed(self.ok[p])]
            clips = {need: _select(b.clips, b.positions, keep) for need, b in zip(needs, batches)}
            # the student's frame indices and decoder go into its .json (any need's when it is
            # not run)
            own = batches[needs.index(self._need("student")) if "student" in roles else 0]
            yield keep, clips, {p: (idx, by) for p, idx, by in
                                zip(own.positions, own.frame_indices, own.decoded_by)}

    def _record_failure(self, pos: int, why: str, known: bool) -> None:
        path = self.index.items[self.ok[pos]].path
        if self.state.is_failed(self.ok[pos]):
            return
        if known:
            raise VideoError(path, f"decoded when the cache was written but fails now: {why}",
                             fix="featurize into a new --out")
        self.state.add_failure(self.ok[pos], why)

    def _infer_and_write(self, writers: dict[str, ShardSetWriter], positions: list[int],
                         clips: dict[Need, torch.Tensor], decoded: dict) -> None:
        if not positions:
            return
        feats = {}
        for role in writers:
            start = time.perf_counter()
            out = self.backbones[role](clips[self._need(role)])       # [B, T', D]
            feats[role] = out.cpu().numpy()
            self.stats.infer_s[role] = self.stats.infer_s.get(role, 0.0) + (
                time.perf_counter() - start)
        start = time.perf_counter()
        for row, pos in enumerate(positions):
            i = self.ok[pos]
            item, key = self.index.items[i], item_key(i, self.index.items[i])
            for role, writer in writers.items():
                extra = None
                if role == "student":
                    extra = student_members(item, self.infos[pos].fps, *decoded[pos],
                                            labelled=self.labelled)
                writer.write(key, feats[role][row], extra)
        self.stats.write_s += time.perf_counter() - start
        self.bar.update(len(positions))

    def _finish_shard(self, k: int, writers: dict[str, ShardSetWriter], kept: int) -> None:
        start = time.perf_counter()
        entries = {role: w.close() for role, w in writers.items()}
        self.stats.write_s += time.perf_counter() - start
        if kept == 0:
            return
        if self.remote:  # finished and verified: uploaded, the local copy deleted
            self.remote.shards([entry for entry, in entries.values()])
        for role, (entry,) in entries.items():
            self.state.record_shard(role, k, entry)
            self.stats.shards += 1
            self.stats.bytes += entry.bytes
        if k >= len(self.state.layout):
            self.state.layout.append(kept)
        self.stats.clips += kept
        save_progress(self.state, self.out)
        if self.remote:
            self.remote.record(self.state.progress_path)

    def _need(self, role: str) -> Need:
        bb = self.backbones[role]
        return bb.frames, bb.size

    def _loader(self, need: Need) -> ClipLoader:
        if need not in self.loaders:
            frames, size = need
            self.loaders[need] = ClipLoader(self.infos, frames=frames, size=size,
                                            batch_size=self.config.batch_size,
                                            device=self.config.device,
                                            num_threads=self.config.decode_threads)
        return self.loaders[need]


def _merged_warnings(batches: list) -> dict[int, list[str]]:
    """Each position's warnings over the batches of every need (each message once)."""
    merged: dict[int, list[str]] = {}
    for batch in batches:
        for pos, notes in batch.warnings.items():
            have = merged.setdefault(pos, [])
            have += [n for n in notes if n not in have]
    return merged


def _select(clips: torch.Tensor, positions: list[int], keep: list[int]) -> torch.Tensor:
    """Rows of ``clips`` (one per decoded position) for the ``keep`` positions, in order."""
    if keep == positions:
        return clips
    row = {p: r for r, p in enumerate(positions)}
    return clips[torch.tensor([row[p] for p in keep], dtype=torch.long, device=clips.device)]
