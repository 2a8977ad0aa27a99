"""Verification: does a shard, or a whole cache, hold exactly what its manifest lists?
A local file or a remote object alike (remote reads retried like the loader's).

``verify_shard`` (``featurize --resume``: keep a finished shard, or write it again) checks the
size, the sha256 and the sample count; ``verify_cache`` (``bombkd inspect --verify``) also
decodes every sample with ``read_shard`` and checks that the models' shards line up.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from tqdm import tqdm

from bombkd_io.errors import ShardError
from bombkd_io.names import locate
from bombkd_io.shards.manifest import Manifest, ShardEntry
from bombkd_io.shards.reader import fetched, open_shard, read_shard
from bombkd_io.shards.tar import CHUNK, iter_samples


def verify_shard(path, entry: ShardEntry) -> bool:
    """True when ``path`` is exactly ``entry``: size, sha256 (when recorded) and sample count."""
    try:
        if fetched(path, lambda: hash_problem(path, entry)):
            return False
        count = fetched(path, lambda: _count(path))
    except (ShardError, OSError):
        return False
    return count == entry.count


def _count(path) -> int:
    with open_shard(path) as f:
        return sum(1 for _ in iter_samples(f, str(path)))


def verify_cache(root: str | Path, manifest: Manifest, *, progress: bool = True) -> list[str]:
    """Re-hash every shard and decode every sample; one line per problem (empty: all good).

    Memory: one shard per model at a time.
    """
    problems = []
    student = manifest.models["student"]
    for k in tqdm(range(len(student.shards)), desc="verify shards", unit="shard",
                  disable=not progress):
        keys = None
        for name, model in manifest.models.items():
            entry = model.shards[k]
            path = locate(str(root), entry.name)
            try:
                if problem := fetched(path, lambda: hash_problem(path, entry)):
                    problems.append(problem)
                labelled = name == "student" and manifest.labels
                data = read_shard(path, entry, model, labels=labelled,
                                  classes=len(manifest.classes) if labelled else None)
            except ShardError as exc:
                problems.append(str(exc))
                continue
            if keys is None:
                keys = data.keys
            elif data.keys != keys:
                problems.append(f"{path}: keys do not line up with the student shard {k}")
    return problems


def hash_problem(path, entry: ShardEntry) -> str | None:
    """Why the file at ``path`` is not the one ``entry`` lists (its size, or its sha256 when
    recorded), or None; the whole file is read in big chunks."""
    digest, size = hashlib.sha256(), 0
    with open_shard(path) as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    if size != entry.bytes or (entry.sha256 and digest.hexdigest() != entry.sha256):
        return (f"{path}: {size} bytes, sha256 {digest.hexdigest()[:12]}...; the manifest "
                f"lists {entry.bytes} bytes, {entry.sha256[:12]}...")
    return None
