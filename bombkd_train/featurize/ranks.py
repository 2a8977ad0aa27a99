"""featurize split over several processes: under ``torchrun`` (one process group, the ranks
exchange what they found) or as a job array (``--rank R --world-size W``, no process group).

Shard k of every model is written by rank ``k % W``. Every rank computes the same plan
(``shard_plan``): shard k takes S samples of the split in index order, skipping the videos known
to fail, so where it starts is a pure function of the failures before it. Its bytes are a pure
function of where it starts (``run.py``), so a shard written from the right start is the one a
one-process run writes, whatever W. A video that probes but fails to decode moves every later
start: its rank records the failure, and the shards planned without it are written again from
their new start; under torchrun the ranks exchange failures after each pass and repeat until no
rank finds a new one, for a job array ``--finalize`` names the shards to redo (``--resume``).

The manifest is written once, after every shard exists and verifies (``write_manifest``): by
rank 0 once the ranks are done under torchrun, by ``bombkd featurize --finalize`` for an array.
Probing: under torchrun each rank probes the videos of its own shards (as planned before any
failure is known) and the ranks exchange what they found; a job array's tasks cannot exchange,
so each probes every video (it reads packets, not frames) to know where its shards start.

A remote ``--out`` (a URL, ``shards.publish``) is written by one process only: several ranks
with a URL are refused (``refuse_remote``); featurize into a folder every rank can write, then
copy the finished cache to the bucket (shards first, the manifest last).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch.distributed as dist

from bombkd_io.datasets import VideoIndex, index_dataset
from bombkd_io.errors import ConfigError
from bombkd_io.lock import lock_folder
from bombkd_io.names import locate, shard_name
from bombkd_io.shards.manifest import Manifest, save_manifest
from bombkd_io.shards.publish import Remote
from bombkd_io.shards.verify import verify_shard
from bombkd_io.storage import is_remote, list_names, remove, size
from bombkd_io.video import index_probed, probe_index, probe_videos
from bombkd_train.config import FeaturizeConfig
from bombkd_train.featurize.state import CacheState, load_state, remove_stale_temps
from bombkd_train.runtime import init_distributed, launch_world

Plan = list[tuple[int, int]]  # per shard k: (index position it starts from, samples)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes writing one cache."""
    rank: int = 0
    world: int = 1
    group: bool = False  # in a torch.distributed process group: the ranks can exchange records

    def owns(self, k: int) -> bool:
        return k % self.world == self.rank

    @property
    def label(self) -> str:
        return f"rank {self.rank}/{self.world}" if self.world > 1 else ""

    def gather(self, obj) -> list:
        """``obj`` of every rank, in rank order (only this one's without a process group)."""
        if not self.group:
            return [obj]
        objs = [None] * self.world
        dist.all_gather_object(objs, obj)
        return objs


def join_ranks(config: FeaturizeConfig) -> tuple[FeaturizeConfig, Ranks]:
    """The config with its device, rank and world size; joins torchrun's process group (one
    device per rank: ``cuda:LOCAL_RANK`` where there are GPUs, gloo on the CPU)."""
    if launch_world() > 1 or config.world_size > 1:
        refuse_remote(config, "torchrun" if launch_world() > 1 else "--rank/--world-size")
    if launch_world() > 1:
        if config.world_size > 1:
            raise ConfigError("--rank/--world-size are for job arrays; under torchrun the rank "
                              "and world size come from torchrun (RANK, WORLD_SIZE): drop them")
        device, rank, world = init_distributed(config.device)
        return replace(config, device=device, rank=rank, world_size=world), \
            Ranks(rank, world, group=True)
    return config, Ranks(config.rank, config.world_size)


def refuse_remote(config: FeaturizeConfig, how: str) -> None:
    """``ConfigError`` for a URL ``--out`` written by several processes (``how``): each would
    publish from its own stage, and none could check the others' objects before the manifest."""
    if is_remote(config.out):
        raise ConfigError(
            f"--out {config.out}: a URL is written by one featurize process, not by several "
            f"({how}); either run one process with this --out, or featurize into a folder "
            "every rank can write (a shared filesystem) and copy the finished cache to "
            f"{config.out} (the shards first, the {config.dataset}-{config.split}.index.json "
            "manifest last)")


def shard_plan(count: int, failed, shard_size: int) -> Plan:
    """(start, samples) of each shard over ``count`` videos in index order, ``failed`` (index
    positions) left out: shard k starts right after the last sample of shard k-1."""
    kept = [i for i in range(count) if i not in failed]
    return [(kept[a - 1] + 1 if a else 0, min(shard_size, len(kept) - a))
            for a in range(0, len(kept), shard_size)]


def probe_shared(index: VideoIndex, device: str, ranks: Ranks, shard_size: int,
                 progress: bool):
    """``probe_index`` of every video; under torchrun each rank probes the videos of its own
    shards as planned before any failure is known (``own_videos``), then they exchange."""
    everything = range(len(index.items))
    if not ranks.group:
        return probe_index(index, everything, device, progress=progress)
    found = ranks.gather(probe_videos([index.items[i].path for i in own_videos(
        len(everything), ranks, shard_size)], device, on_error="skip", progress=progress))
    infos = [info for part, _ in found for info in part]
    failed = [f for _, part in found for f in part]
    return index_probed(index, everything, infos, failed)


def own_videos(count: int, ranks: Ranks, shard_size: int) -> list[int]:
    """Index positions of this rank's shards when every video decodes: its files, which it
    then decodes (read once on this node, unless a failure moves a shard's start)."""
    return [i for i in range(count) if ranks.owns(i // shard_size)]


def exchange(state: CacheState, ranks: Ranks, out: Path) -> None:
    """Merge every rank's finished shards and failures into ``state`` (all ranks alike)."""
    light = replace(state, index=None, ok=None)  # what the others need; not the video list
    for rank, other in enumerate(ranks.gather(light)):
        if rank != ranks.rank:
            state.merge(other, out)


def stale_shards(state: CacheState, plan: Plan, roles) -> list[tuple[str, int]]:
    """(role, k) of the planned shards not recorded as written from their planned start."""
    return [(role, k) for role in roles for k, (start, count) in enumerate(plan)
            if not written(state, role, k, start, count)]


def written(state: CacheState, role: str, k: int, start: int, count: int) -> bool:
    """Shard k of ``role`` is recorded with ``count`` samples, written from ``start`` (or in
    index order: a manifest's, a one-process run's)."""
    entry = state.done.get(role, {}).get(k)
    began = state.starts.get(role, {}).get(k, start)
    return entry is not None and entry.count == count and began == start


def write_manifest(state: CacheState, plan: Plan, *, verify: bool,
                   remote: Remote | None = None) -> Manifest:
    """The manifest, once every planned shard of every model is written and verifies (size,
    and with ``verify`` the sha256 and count); shards past the plan's end (planned before a
    failure was known) are removed, and so are the progress records. With ``remote`` (one
    process's URL ``--out``) the shards are checked and removed there, and the manifest is
    uploaded last (``Remote.finish``, the one place that publishes it)."""
    cfg, out = state.config, Path(state.config.out)
    where = remote.root if remote else str(out)  # where the shards are
    stale = stale_shards(state, plan, state.all_roles())
    bad = [(role, k) for role in state.all_roles() for k in range(len(plan))
           if (role, k) not in stale and not _on_disk(where, state.done[role][k], verify)]
    if stale or bad:
        raise ConfigError(_missing_message(cfg, stale + bad, len(plan) * len(state.models)))
    for role in state.all_roles():
        for k in [k for k in state.done.get(role, {}) if k >= len(plan)]:
            state.done[role].pop(k)
        _remove_past(where, cfg.dataset, cfg.split, role, len(plan))
    state.layout, state.final = [count for _, count in plan], True
    manifest = state.manifest()
    path = save_manifest(manifest, out)
    if remote:
        remote.finish(path, state.progress_path)
    state.drop_progress()
    remove_stale_temps(out, cfg.dataset, cfg.split, state.all_roles())
    return manifest


def _remove_past(root: str, dataset: str, split: str, role: str, shards: int) -> None:
    """Remove the shard files of ``role`` numbered ``shards`` or more under ``root`` (a folder
    or a URL; written from a plan made before a failure was known; a killed rank may not have
    recorded one): exactly those names."""
    prefix = f"{dataset}-{split}-{role}-"
    for name in list_names(root):
        number = name[len(prefix):-len(".tar")]
        if name.startswith(prefix) and name.endswith(".tar") and number.isdigit() and \
                int(number) >= shards and name == shard_name(dataset, split, role, int(number)):
            remove(locate(root, name))


def _on_disk(root: str, entry, verify: bool) -> bool:
    path = locate(root, entry.name)
    if verify:
        return verify_shard(path, entry)
    return size(path) == entry.bytes


def _missing_message(cfg: FeaturizeConfig, missing: list[tuple[str, int]], needed: int) -> list:
    names = [shard_name(cfg.dataset, cfg.split, role, k) for role, k in sorted(missing)]
    shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
    ks = sorted({k for _, k in missing})
    return [f"--out {cfg.out}: {len(names)} of the {needed} shard files "
            f"the manifest needs are missing, do not verify, or were planned before a video was "
            f"found to fail: {shown} (shard numbers {ks[:12]}{' ...' if len(ks) > 12 else ''})",
            "write them with the run's command and --resume, as one process or as a job array "
            "of any size (--rank R --world-size W writes the shards k with k % W == R), then "
            "run --finalize again"]


def finalize_featurize(config: FeaturizeConfig) -> Manifest:
    """``featurize --finalize``: the manifest of a cache the tasks of a job array wrote, from
    their progress records, once every shard exists and verifies (sha256); any machine."""
    config.validate()
    refuse_remote(config, "--finalize")
    index = index_dataset(config.dataset, config.root, config.split)
    with lock_folder(config.out, argument="--out", name=f"{config.dataset}-{config.split}"):
        state = load_state(replace(config, resume=True), index)
        if state.final:
            return state.manifest()
        if not state.done:
            raise ConfigError(f"--out {config.out}: no featurize run to finalize there (no "
                              f"progress record of {config.dataset}-{config.split}); run "
                              "featurize with --rank/--world-size first")
        plan = shard_plan(len(index.items), state.failed, state.config.shard_size)
        return write_manifest(state, plan, verify=True)
