"""Read shards back: a lean tar parser over local files and URLs (the hot path).

The mirror image of writer.py. A local shard is opened as a file; a shard under a URL root the
user typed goes through ``webdataset.gopen`` (``file:``, ``pipe:``, ``http(s)`` through curl,
...); its location comes from ``bombkd_io.names.locate``, never from a name read from a file
alone. The tar stream is then parsed by ``tar.py``, without webdataset's per-sample dict
pipeline.

``read_shard`` (the cached loader's) reads a whole shard into one ``[N, T', D]`` array: with
``tar.read_regular`` in a few array operations when the shard is regular (as written by
``ShardSetWriter``), by the member walk otherwise.
"""
from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from bombkd_io.errors import ErrorPolicy, FormatError, ShardError
from bombkd_io.names import is_url, locate
from bombkd_io.shards.codec import DTYPES, decode_label, decode_tensor
from bombkd_io.shards.manifest import ModelEntry, ShardEntry
from bombkd_io.shards.tar import CHUNK, iter_samples, read_into, read_regular

TAIL = 1 << 20   # bytes read past a remote shard's listed size before calling it too large
REPAIR = "`bombkd featurize --resume` rewrites shards that do not verify"  # said on a skip


@contextlib.contextmanager
def open_shard(url) -> Iterator:
    """A shard opened as a local file (a ``Path``, or a string without a URL scheme), else
    through ``webdataset.gopen`` (a URL the user typed as the root: ``file:``, ``pipe:``,
    ``http(s)``, ...); I/O errors become ShardError naming it."""
    try:
        with (wds.gopen(url, "rb") if is_url(url) else open(url, "rb")) as f:
            yield f
    except ShardError:
        raise
    except (OSError, ValueError) as exc:  # missing file, failing pipe, unknown URL scheme
        raise ShardError(url, f"cannot read ({exc})") from exc


@dataclass
class ShardData:
    """One shard of one model, decoded: rows in tar order (position p is sample k*S + p)."""
    keys: list[str | None]    # None where a sample was skipped
    features: np.ndarray      # [N, T', D] in the cache dtype
    labels: np.ndarray | None  # int64 [N] (student set), -1 where skipped
    present: np.ndarray       # bool [N]


def read_shard(url, entry: ShardEntry, model: ModelEntry, *, labels: bool,
               classes: int | None = None, policy: ErrorPolicy | None = None) -> ShardData:
    """Read one shard whole into ``[count, T', D]`` (the hot path of the cached loader).

    ``classes``: labels must lie in ``[0, classes)``; a sample whose label does not is a bad
    sample like any other. ``policy`` (default: raise) handles each bad shard or sample: a
    ShardError naming it, or left out and recorded in the policy."""
    policy = policy if policy is not None else ErrorPolicy()
    shape, dtype, member = (model.tokens, model.dim), DTYPES[model.dtype], f"{model.name}.mp"
    try:
        _check_local_size(url, entry)
        with open_shard(url) as f:
            buf = np.empty(entry.bytes, np.uint8)  # the manifest's size (bounded by check_manifest)
            filled = read_into(f, memoryview(buf))
            rest = f.read(TAIL)
            if len(rest) == TAIL and f.read(1):
                raise ShardError(url, f"larger than the manifest lists ({entry.bytes} bytes)")
    except ShardError as exc:
        policy.handle(exc, entry.count, fix=REPAIR)
        return _empty(entry.count, shape, dtype, labels)
    fast = None
    if filled == len(buf) and not rest:
        fast = read_regular(buf, entry.count, member, shape, dtype, labels)
    if fast is not None:
        keys, features, cls = fast
        data = ShardData(keys, features, cls, np.ones(entry.count, bool))
    else:  # irregular: walk member by member, naming the first bad sample
        view = memoryview(buf)[:filled] if not rest else memoryview(buf[:filled].tobytes() + rest)
        data = _walk(view, str(url), entry.count, member,
                     _empty(entry.count, shape, dtype, labels), policy)
    return _check_labels(data, str(url), classes, policy)


def _check_labels(data: ShardData, shard: str, classes: int | None,
                  policy: ErrorPolicy) -> ShardData:
    """Labels outside ``[0, classes)`` make their samples bad ones (raised, or skipped)."""
    if data.labels is None or classes is None:
        return data
    bad = data.present & ((data.labels < 0) | (data.labels >= classes))
    if not bad.any():
        return data
    first = int(np.argmax(bad))
    error = ShardError(shard, f"label {data.labels[first]} is outside [0, {classes}): the "
                       f"manifest lists {classes} classes", data.keys[first],
                       fix="featurize the cache again, or pass --on-error skip")
    policy.handle(error, int(bad.sum()), fix=REPAIR)
    data.present[bad] = False
    for pos in np.flatnonzero(bad):
        data.keys[pos] = None
    return data


def _local_path(url: str) -> Path | None:
    """The file a local shard URL (a plain path or ``file:``) names; None for pipes and remotes."""
    url = str(url)
    if url.startswith("file:"):
        return Path(url[len("file://"):] if url.startswith("file://") else url[len("file:"):])
    return None if "://" in url or url.startswith("pipe:") else Path(url)


def _check_local_size(url: str, entry: ShardEntry) -> None:
    """A local shard must be the size its manifest lists: checked before allocating for it."""
    path = _local_path(url)
    if path is None:
        return
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ShardError(url, f"cannot read ({exc})") from exc
    if size != entry.bytes:
        raise ShardError(url, f"{size} bytes on disk, the manifest lists {entry.bytes}"
                         + (" (truncated?)" if size < entry.bytes else ""))


def _empty(n: int, shape: tuple[int, int], dtype, labels: bool) -> ShardData:
    return ShardData([None] * n, np.empty((n, *shape), dtype),
                     np.full(n, -1, np.int64) if labels else None, np.zeros(n, bool))


def _walk(view: memoryview, shard: str, n: int, member: str, data: ShardData,
          policy: ErrorPolicy) -> ShardData:
    """Fill ``data`` sample by sample; errors name the sample (or are skipped and counted)."""
    done, labels = 0, data.labels is not None
    try:
        for key, fields in iter_samples(view, shard):
            if done == n:
                raise ShardError(shard, f"holds more than the {n} samples the manifest "
                                 "lists", key)
            try:
                _fill(data, done, shard, key, fields, member, labels)
            except ShardError as exc:
                policy.handle(exc, 1, fix=REPAIR)
            done += 1
        if done < n:
            raise ShardError(shard, f"holds {done} samples, the manifest lists {n} (truncated?)")
    except ShardError as exc:
        policy.handle(exc, n - done, fix=REPAIR)
    return data


def _fill(data: ShardData, pos: int, shard: str, key: str, fields: dict, member: str,
          labels: bool) -> None:
    payload = fields.get(member)
    if payload is None:
        raise ShardError(shard, f"sample has no {member} member (has {sorted(fields)})", key)
    array = _decode(decode_tensor, payload, shard, key)
    if array.shape != data.features.shape[1:] or array.dtype != data.features.dtype:
        raise ShardError(shard, f"features {array.dtype}{list(array.shape)}; the manifest says "
                         f"{data.features.dtype}{list(data.features.shape[1:])}", key)
    if labels:
        cls = fields.get("cls")
        if cls is None:
            raise ShardError(shard, "Cached features do not contain labels (no .cls member)",
                             key, fix="re-run `bombkd featurize` to write them")
        data.labels[pos] = _decode(decode_label, cls, shard, key)
    data.features[pos] = array
    data.keys[pos] = key
    data.present[pos] = True


def _decode(decode, payload, shard: str, key: str):
    """``decode(payload)`` (a codec decoder); its ``FormatError`` as a ShardError naming the
    sample."""
    try:
        return decode(payload, where=f"{shard} sample {key}")
    except FormatError as exc:
        raise ShardError(shard, str(exc), key) from exc


def hash_file(url: str) -> tuple[int, str]:
    """(bytes, sha256 hex) of a whole file, read in big chunks."""
    digest, size = hashlib.sha256(), 0
    with open_shard(url) as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def verify_shard(path: str, entry: ShardEntry, keys: list[str] | None = None) -> bool:
    """True when ``path`` is exactly ``entry``: size, sha256 (when recorded), sample count and,
    if given, the keys in order. For ``featurize --resume`` and ``bombkd inspect --verify``."""
    try:
        size, digest = hash_file(path)
        if size != entry.bytes or (entry.sha256 and digest != entry.sha256):
            return False
        with open_shard(path) as f:
            found = [key for key, _ in iter_samples(f, str(path))]
    except (ShardError, OSError):
        return False
    return len(found) == entry.count and (keys is None or found == list(keys))


def verify_cache(root, manifest, *, progress: bool = True) -> list[str]:
    """Re-hash every shard and decode every sample; one line per problem (empty: all good).

    Memory: one shard per model at a time.
    """
    root, problems = Path(root), []
    student = manifest.models["student"]
    for k in tqdm(range(len(student.shards)), desc="verify shards", unit="shard",
                  disable=not progress):
        keys = None
        for name, model in manifest.models.items():
            entry = model.shards[k]
            path = locate(str(root), entry.name)
            try:
                size, digest = hash_file(path)
                if (size, digest) != (entry.bytes, entry.sha256):
                    problems.append(f"{path}: {size} bytes, sha256 {digest[:12]}...; the "
                                    f"manifest lists {entry.bytes} bytes, {entry.sha256[:12]}...")
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
