"""The featurize run: videos -> clips -> every backbone -> one shard set per model (cache format 1).

The stages, in order (each clip is decoded once per distinct (frames, size) the models need,
and the student and every teacher run on that one decode):

    index_dataset        VideoIndex, items in split order
    probe_shared         the decodable items (the "ok list"); unreadable ones are recorded
    shard plan           shard k starts after shard k-1's last sample and takes S decoded
                         samples (ranks.shard_plan; again after each shard, as failures appear)
    ClipLoader.batches   uint8 clips per need, decoded in a background thread, with warnings
    Backbone             features [B, T', D] per model
    ShardSetWriter       shard k of every model: same samples, order and keys
    progress / manifest  the progress file after every shard; the manifest last, atomically

Shard k of a run is a pure function of where it starts: its batches are consecutive chunks of
``batch_size`` from that position (one more round per failed video), so a shard can be redone
alone (``--resume``, or a teacher added later) and comes out byte-identical, and so can a shard
that another process writes (``ranks.py``: shard k by rank k % W).

A video that probes or decodes with warnings (libav messages, fewer frames than its header
claims, frames repeated although others were asked for: ``bombkd_io.video.health``) is cached
and listed in the manifest's ``suspect``; with ``--strict`` it is left out and listed in
``failed`` instead (not in shards written before: their samples are fixed).
"""
from __future__ import annotations

import bisect
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from bombkd_io.datasets import VideoIndex, index_dataset, item_key
from bombkd_io.errors import ConfigError, DatasetError, VideoError
from bombkd_io.lock import lock_folder
from bombkd_io.names import locate
from bombkd_io.shards.manifest import Manifest, ShardEntry
from bombkd_io.shards.publish import Remote, staged_out
from bombkd_io.shards.verify import verify_shard
from bombkd_io.shards.writer import ShardSetWriter
from bombkd_io.video import ClipLoader, parse_device
from bombkd_train.backbones import Backbone, create_backbone
from bombkd_train.featurize.estimate import DiskEstimate, check_free_space, estimate_bytes
from bombkd_train.config import FeaturizeConfig
from bombkd_train.featurize.ranks import (Plan, Ranks, exchange, join_ranks, own_videos,
                                          probe_shared, shard_plan, write_manifest, written)
from bombkd_train.featurize.sample import student_members
from bombkd_train.featurize.state import CacheState, load_state, remove_stale_temps, save_progress
from bombkd_train.featurize.stats import FeaturizeStats, gather_stats
from bombkd_train.runtime import model_threads, parity_settings

Need = tuple[int, int]  # (frames, size) a backbone consumes


def featurize(config: FeaturizeConfig, *,
              stats: FeaturizeStats | None = None) -> Manifest | None:
    """Write (or complete) the feature cache ``config`` describes; returns its manifest.

    A new teacher on an existing cache adds only its shard set; ``resume`` keeps the shards
    that verify and redoes the rest. Refuses a cache in ``out`` made with another student, and
    a second run into ``out`` for the same (dataset, split) while one is going.

    Under torchrun, or with ``config.rank`` / ``config.world_size`` (a job array's task), this
    process writes its share of the shards (``ranks.py``); a job array's task returns None (the
    manifest is ``finalize_featurize``'s), torchrun's ranks all return the manifest rank 0 wrote.
    """
    stats = stats if stats is not None else FeaturizeStats()
    start = time.perf_counter()
    config.validate()
    config = replace(config, device=parse_device(config.device))  # torch's name for "auto", "gpu"
    config, ranks = join_ranks(config)
    index = index_dataset(config.dataset, config.root, config.split)
    # one run per (dataset, split) in --out (one per rank of a run over several processes);
    # with the lock, temporary files of what it owns are a killed run's. A remote --out: written
    # into a local stage, each finished piece published (shards.publish; one process only)
    name = f"{config.dataset}-{config.split}" + (f".rank{ranks.rank}" if ranks.world > 1 else "")
    with staged_out(config.out, config.dataset, config.split) as (out, remote), \
            lock_folder(out, argument="--out", name=name):
        config = replace(config, out=out)
        state = load_state(config, index)
        if ranks.world == 1:  # several ranks: at the end, once none is writing
            remove_stale_temps(Path(config.out), config.dataset, config.split, state.all_roles())
        # the backbones run as video mode's student does: full fp32, deterministic kernels
        with model_threads(config.device, config.decode_threads) as threads, parity_settings():
            stats.threads = threads
            manifest = _Run(config, index, state, stats, ranks, remote).execute()
    stats.total_s = time.perf_counter() - start
    if ranks.world > 1:
        gather_stats(stats, ranks)
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
                 stats: FeaturizeStats, ranks: Ranks, remote: Remote | None = None):
        self.config, self.index, self.state, self.stats = config, index, state, stats
        self.ranks = ranks
        self.out = Path(config.out)
        self.remote = remote  # a remote --out: the stage's finished pieces go there
        self.labelled = index.labelled  # else the student's samples have no .cls
        self.checked: dict[tuple[str, int], ShardEntry] = {}  # shards known to verify
        self.clips: dict[int, int] = {}  # shard k -> samples this process wrote in it
        self.planned: tuple[int, Plan] = (-1, [])  # (failures known, the plan made from them)

    def execute(self) -> Manifest | None:
        """The manifest; None for a job array's task (``--finalize`` writes it)."""
        cfg, state = self.config, self.state
        if not state.roles_to_run(cfg) and not cfg.resume:
            return state.manifest()
        self._probe()
        try:
            self._write_shards()
        finally:
            for loader in self.loaders.values():  # decode threads and DALI pipelines
                loader.close()
        manifest = self._manifest()
        # a shard written again from its new start (a failure found by another rank) counts once
        kept = sum(n for k, n in self.clips.items() if k < len(self._plan()))
        self.stats.clips, self.stats.again = kept, self.stats.clips - kept
        if manifest is not None:
            self.stats.failed = len(manifest.failed)
            self.stats.failed_videos, self.stats.suspect_videos = manifest.failed, manifest.suspect
        return manifest

    def _manifest(self) -> Manifest | None:
        """Written once, by rank 0 (every rank returns it); a job array's tasks leave it to
        ``--finalize``."""
        ranks, plan = self.ranks, self._plan()
        if ranks.world > 1 and not ranks.group:
            save_progress(self.state, self.out)
            self.stats.failed = len(self.state.failed)
            return None
        error = None
        if ranks.rank == 0:
            try:
                write_manifest(self.state, plan, verify=False, remote=self.remote)
            except ConfigError as exc:
                error = exc
        if ranks.group and (error := ranks.gather(error)[0]) is None:
            self.state.layout, self.state.final = [count for _, count in plan], True
        if error is not None:
            raise error
        return self.state.manifest()

    def _write_shards(self) -> None:
        """This rank's shards that are missing, planned from another start, or (``--resume``)
        do not verify; under torchrun, again until no rank finds a new failure."""
        cfg, state = self.config, self.state
        roles = state.roles_to_check(cfg)
        plan = self._plan()
        todo = self._todo(plan, roles)
        run = {r for _, redo in todo for r in redo} | (set() if state.final else set(roles))
        self.backbones = {r: self._backbone(r) for r in state.all_roles() if r in run}
        need = estimate_bytes(cfg, self.index, state, {r: state.models[r] for r in self.backbones})
        # a remote --out: the local stage holds one shard of each model at a time
        check_free_space(self.out, -(-need.total // max(1, need.shards)) if self.remote
                         else need.total)
        total = sum(plan[k][1] for k, _ in todo)
        desc = " ".join(filter(None, (f"featurize {cfg.dataset}-{cfg.split}", self.ranks.label)))
        with tqdm(total=total, unit="clips", desc=desc, position=self.ranks.rank,
                  disable=not cfg.progress, dynamic_ncols=True) as self.bar:
            while True:
                known = set(state.failed)
                k = self.ranks.rank
                while k < len(plan := self._plan()):
                    if redo := self._redo(plan, k, roles):
                        self._shard(k, plan[k], redo)
                    k += self.ranks.world
                if not self.ranks.group:
                    return
                exchange(state, self.ranks, self.out)
                if set(state.failed) == known:  # the same set on every rank: all stop together
                    return

    def _plan(self) -> Plan:
        """Every shard's (start, samples), from the failures known now; a finished cache's
        layout is fixed. Made again only when a failure was added (failures are never removed)."""
        state = self.state
        if self.planned[0] == len(state.failed):
            return self.planned[1]
        plan = shard_plan(len(self.index.items), state.failed, state.config.shard_size)
        if state.final:
            if [count for _, count in plan[:len(state.layout)]] != state.layout:
                raise DatasetError(f"the cache in {self.config.out} holds {state.layout} samples "
                                   "per shard; the videos now give others (the dataset "
                                   "changed: featurize into a new --out)")
            plan = plan[:len(state.layout)]
        self.planned = (len(state.failed), plan)
        return plan

    def _todo(self, plan: Plan, roles: list[str]) -> list[tuple[int, list[str]]]:
        return [(k, redo) for k in range(self.ranks.rank, len(plan), self.ranks.world)
                if (redo := self._redo(plan, k, roles))]

    def _redo(self, plan: Plan, k: int, roles: list[str]) -> list[str]:
        """The roles whose shard k is missing, written from another start, or (``--resume``)
        does not verify (size, sha256, count)."""
        start, count = plan[k]
        return [r for r in roles if not (written(self.state, r, k, start, count)
                                         and self._verifies(r, k))]

    def _verifies(self, role: str, k: int) -> bool:
        entry = self.state.done[role][k]
        if not self.config.resume or self.checked.get((role, k)) == entry:
            return True
        where = self.remote.root if self.remote else str(self.out)  # --resume: the remote's
        if verify_shard(locate(where, entry.name), entry):
            self.checked[role, k] = entry
            return True
        return False

    def _probe(self) -> None:
        start = time.perf_counter()
        # the video package maps "cpu" / "cuda[:N]" to its decoder device itself
        self.ok, self.infos, failed = probe_shared(  # ok pos -> index pos, and their infos
            self.index, self.config.device, self.ranks, self.state.config.shard_size,
            self.config.progress)
        warned = [(info.path, list(info.warnings)) for info in self.infos if info.warnings]
        self.state.set_probe(self.ok, failed, warned)
        mine = None  # under torchrun, the videos this process probed (probe_shared)
        if self.ranks.group:
            mine = {self.index.items[i].path for i in own_videos(
                len(self.index.items), self.ranks, self.state.config.shard_size)}
        self.stats.found_failed += sum(1 for path, _ in failed if mine is None or path in mine)
        self.loaders: dict[Need, ClipLoader] = {}
        self.stats.probe_s = time.perf_counter() - start

    def _backbone(self, role: str) -> Backbone:
        entry = self.state.models[role]
        bb = create_backbone(entry.backbone, frames=entry.frames or None,
                             size=entry.size or None, pool=entry.pooling, device=self.config.device,
                             revision=entry.revision)
        self.state.fill_model(role, bb)
        return bb

    def _shard(self, k: int, planned: tuple[int, int], roles: list[str]) -> None:
        """Write shard k of ``roles`` from its planned start (an index position).

        A shard another model already has must come out with the same samples (``known``);
        a new one takes the next S videos that decode (fewer at the end)."""
        cfg, state = self.config, self.state
        start, count = planned
        known = state.final or any(written(state, r, k, start, count) for r in state.all_roles()
                                   if r not in roles)
        target = count if known else cfg.shard_size
        writers = {r: ShardSetWriter(self.out, cfg.dataset, cfg.split, r, cfg.shard_size,
                                     state.models[r].dtype, start_shard=k) for r in roles}
        pos, kept = bisect.bisect_left(self.ok, start), 0  # ok position of the start
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
        self._finish_shard(k, writers, kept, start)

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
        self.stats.found_failed += 1

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

    def _finish_shard(self, k: int, writers: dict[str, ShardSetWriter], kept: int,
                      start: int) -> None:
        began = time.perf_counter()
        entries = {role: w.close() for role, w in writers.items()}
        self.stats.write_s += time.perf_counter() - began
        if kept == 0:
            return
        if self.remote:  # finished and verified: uploaded, the local copy deleted
            self.remote.shards([entry for entry, in entries.values()])
        for role, (entry,) in entries.items():
            self.state.record_shard(role, k, entry, start)
            self.checked[role, k] = entry
            self.stats.shards += 1
            self.stats.bytes += entry.bytes
        if not self.state.final:  # the shards every model has, from the start on
            self.state.layout = self._written_prefix()
        self.stats.clips += kept
        self.clips[k] = kept
        save_progress(self.state, self.out)
        if self.remote:
            self.remote.record(self.state.progress_path)

    def _written_prefix(self) -> list[int]:
        layout = []
        for k, (start, count) in enumerate(self._plan()):
            if not all(written(self.state, r, k, start, count) for r in self.state.all_roles()):
                break
            layout.append(count)
        return layout

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
