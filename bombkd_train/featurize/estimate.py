"""The exact size of a feature cache before it is written (``featurize --dry-run``).

Every member's size comes from its encoder (``bombkd_io.shards.codec``), every shard's from the
tar arithmetic of ``bombkd_io.shards.tar``; the student's ``.json`` is bounded from the item's
path and class name (``sample.student_members``, which featurize writes).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bombkd_io.atomic import format_bytes
from bombkd_io.datasets import VideoIndex
from bombkd_io.errors import ConfigError
from bombkd_io.shards.codec import encode_label, encode_meta, encode_tensor
from bombkd_io.shards.manifest import ModelEntry
from bombkd_io.shards.tar import archive_bytes, member_bytes
from bombkd_io.video.route import DECODED_BY
from bombkd_train.config import FeaturizeConfig
from bombkd_train.featurize.sample import student_members
from bombkd_train.featurize.state import CacheState


@dataclass
class DiskEstimate:
    """Bytes a run writes per model (videos not yet probed are counted as readable)."""
    out: str
    samples: int
    shards: int
    per_model: dict[str, int]   # role -> bytes to write
    free: int                   # bytes free on the filesystem of ``out``

    @property
    def total(self) -> int:
        return sum(self.per_model.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.free

    def summary(self) -> str:
        if not self.per_model:
            return f"nothing to write: {self.out} already holds every model asked for"
        lines = [f"{role:>18}: {format_bytes(n):>10}" for role, n in self.per_model.items()]
        verdict = "fits" if self.fits else "DOES NOT FIT"
        return "\n".join([f"would write {self.samples} samples in {self.shards} shard(s) per "
                          f"model to {self.out}:", *lines,
                          f"{'total':>18}: {format_bytes(self.total):>10} ({self.total} bytes); "
                          f"{format_bytes(self.free)} free: {verdict}"])


def _student_bound(item, frames: int, labelled: bool) -> int:
    """Upper bound of the student's members beside its features: .cls, and .json with frame
    indices of <= 6 digits, the longest fps and the longest ``decoded_by``."""
    extra = student_members(item, 1 / 3 * 1e3, [999999] * frames, max(DECODED_BY, key=len),
                            labelled=labelled)
    label = member_bytes(len(encode_label(extra["cls"]))) if "cls" in extra else 0
    return label + member_bytes(len(encode_meta(extra["json"])))


def estimate_bytes(config: FeaturizeConfig, index: VideoIndex, state: CacheState,
                   shapes: dict[str, ModelEntry]) -> DiskEstimate:
    """Bytes the roles in ``shapes`` would write: exact tar arithmetic over every sample."""
    if state.final:
        layout = state.layout
    else:
        usable = state.ok if state.ok is not None else range(len(index.items))
        count = sum(1 for i in usable if i not in state.failed)
        layout = [min(config.shard_size, count - s) for s in range(0, count, config.shard_size)]
    items = [it for i, it in enumerate(index.items) if i not in state.failed]
    labelled = index.labelled
    per_model = {}
    for role, e in shapes.items():
        feature = member_bytes(len(encode_tensor(np.zeros((e.tokens, e.dim), dtype=e.dtype))))
        total, pos = 0, 0
        for count in layout:
            body = count * feature
            if role == "student":
                body += sum(_student_bound(it, e.frames, labelled)
                            for it in items[pos:pos + count])
            total += archive_bytes(body)
            pos += count
        per_model[role] = total
    return DiskEstimate(config.out, sum(layout), len(layout), per_model, free_bytes(config.out))


def free_bytes(out) -> int:
    """Free bytes on the filesystem ``out`` is (or will be) on."""
    probe = Path(out).absolute()
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_free_space(out: Path, need: int) -> None:
    free = free_bytes(out)
    if need > free:
        raise ConfigError(f"--out {out}: this run writes {format_bytes(need)}, only "
                          f"{format_bytes(free)} are free there; free some space or choose "
                          "another --out")
