"""Read one shard back into arrays: ``read_shard`` -> ``ShardData`` (the cached loader's hot path).

A local shard is opened as a file; a shard under a remote root (``s3://``, ``gs://``,
``https://``...) through ``bombkd_io.storage`` (fsspec), read whole in one large ranged read and
retried on transient errors; a ``file:`` or ``pipe:`` root the user typed through
``webdataset.gopen``. Its location comes from ``bombkd_io.names.locate``, never from a name read
from a file alone. ``read_shard``:
  _load_shard     the shard's bytes, no more than the manifest lists (checked before allocating),
                  in large reads into one buffer (``BufferPool`` reuses them across shards);
                  a remote one in one GET (``storage.read_head``), retried
                  (``storage.retrying``), then a ShardError naming it; or, with ``mapped``, a
                  local one kept open and mapped read-only (``open_mapped`` -> ``ShardFile``),
                  its pages not in the page cache read in (``_make_resident``: large
                  sequential reads); its rows are then read straight into batches
                  (``ShardData.copy_row``)
  read_regular    (tar.py) all samples at once, when the shard is regular (what the writer makes)
  _walk           else tar.iter_samples decoded sample by sample, naming the first bad one
  _check_labels   labels outside [0, classes) make their samples bad ones
Each bad shard or sample goes to the ``ErrorPolicy``: raised, or left out and recorded.
``read_meta`` yields the student's ``KEY.json`` of each sample of a shard (video mode reads
``decoded_by`` from it).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import os
import stat
import sys
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds

from bombkd_io.errors import ErrorPolicy, FormatError, ShardError
from bombkd_io.names import is_url
from bombkd_io.shards.codec import DTYPES, decode_label, decode_meta, decode_tensor
from bombkd_io.shards.manifest import ModelEntry, ShardEntry
from bombkd_io.shards.tar import CHUNK, iter_samples, read_into, read_regular
from bombkd_io.storage import is_remote, open_remote, read_head, retrying

TAIL = 1 << 20   # bytes read past a remote shard's listed size before calling it too large
REPAIR = "`bombkd featurize --resume` rewrites shards that do not verify"  # said on a skip
CAN_MAP = hasattr(os, "preadv") and hasattr(mmap, "PROT_READ")  # ShardFile needs both (POSIX)
SHRUNK = "became shorter while being read (rewritten in place?)"  # a shard open for reading
REPAIR_NOW = "re-run `bombkd featurize --resume` once nothing writes the cache"


def fetched(url, read):
    """``read()``; for a remote ``url`` retried on transient errors (``storage.retrying``)."""
    return retrying(read, str(url)) if is_remote(url) else read()


@contextlib.contextmanager
def open_shard(url) -> Iterator:
    """A shard opened as a local file (a ``Path``, or a string without a URL scheme), through
    fsspec (a remote URL: its errors are ``storage.retrying``'s to sort), else through
    ``webdataset.gopen`` (``file:``, ``pipe:`` typed by the user); I/O errors become ShardError
    naming it."""
    if is_remote(url):
        with open_remote(url) as f:
            yield f
        return
    try:
        with (wds.gopen(url, "rb") if is_url(url) else open(url, "rb")) as f:
            yield f
    except ShardError:
        raise
    except (OSError, ValueError) as exc:  # missing file, failing pipe, unknown URL scheme
        raise ShardError(url, f"cannot read ({exc})") from exc


def read_meta(url) -> Iterator[tuple[str, dict]]:
    """(key, its ``KEY.json`` object) for each sample of a student shard that has one, in tar
    order; ShardError naming the shard and sample for a bad archive or member. A remote shard
    is read whole first (retried like ``read_shard``)."""
    if is_remote(url):
        yield from fetched(url, lambda: list(_meta(url)))
    else:
        yield from _meta(url)


def _meta(url) -> Iterator[tuple[str, dict]]:
    with open_shard(url) as f:
        for key, fields in iter_samples(f, str(url)):
            if "json" in fields:
                yield key, _decode(decode_meta, fields["json"], str(url), key)


@dataclass
class ShardData:
    """One shard of one model, decoded: rows in tar order (position p is sample k*S + p)."""
    keys: list[str | None]    # None where a sample was skipped
    features: np.ndarray      # [N, T', D] in the cache dtype
    labels: np.ndarray | None  # int64 [N] (student set), -1 where skipped
    present: np.ndarray       # bool [N]
    file: ShardFile | None = None  # a mapped local shard: rows are read from it

    def copy_row(self, i: int, out: np.ndarray) -> None:
        """``out[...] = features[i]``: read from the page cache when the shard is a mapped
        ``ShardFile``, else copied from memory."""
        if self.file is None:
            out[...] = self.features[i]
        else:
            self.file.read_row(self.features[i], out)


def read_shard(url: str | Path, entry: ShardEntry, model: ModelEntry, *, labels: bool,
               classes: int | None = None, policy: ErrorPolicy | None = None,
               buffer: np.ndarray | None = None, mapped: bool = False) -> ShardData:
    """Read one shard whole into ``[count, T', D]`` (the hot path of the cached loader).

    ``classes``: labels must lie in ``[0, classes)``; a sample whose label does not is a bad
    sample like any other. ``policy`` (default: raise) handles each bad shard or sample: a
    ShardError naming it, or left out and recorded in the policy. ``buffer``: uint8 bytes to
    read the shard into when it holds at least ``entry.bytes`` (``BufferPool.take``); the
    features of a regular shard are a view into it, so it must not be reused while they live.
    ``mapped``: a local shard is opened as a ``ShardFile`` instead (``open_mapped``; read as
    above where it cannot be mapped): its features are a read-only view of the page cache and
    ``ShardData.copy_row`` reads a row straight into a batch, so its bytes are copied once.
    Such a shard is read after this returns, so a shard changed under the loader from then on
    is a ShardError from ``copy_row`` whatever the policy."""
    policy = policy if policy is not None else ErrorPolicy()
    shape, dtype, member = (model.tokens, model.dim), DTYPES[model.dtype], f"{model.name}.mp"
    path = local_path(url) if mapped and CAN_MAP else None
    try:
        file = open_mapped(url, path, entry) if path is not None else None
        if file is not None:
            buf, complete = file.view, True
        else:
            buf, complete = fetched(url, lambda: _load_shard(url, entry, buffer))
        fast = read_regular(buf, entry.count, member, shape, dtype, labels) if complete else None
        if fast is None and file is not None:  # walked from a read, never through the mapping
            file, (buf, complete) = None, _load_shard(url, entry, buffer)
    except ShardError as exc:
        policy.handle(exc, entry.count, fix=REPAIR)
        return _empty(entry.count, shape, dtype, labels)
    if fast is not None:
        keys, features, cls = fast
        data = ShardData(keys, features, cls, np.ones(entry.count, bool), file)
    else:  # irregular: walk member by member, naming the first bad sample
        data = _walk(memoryview(buf), str(url), entry.count, member,
                     _empty(entry.count, shape, dtype, labels), policy)
    return _check_labels(data, str(url), classes, policy)


def _load_shard(url, entry: ShardEntry, buffer: np.ndarray | None) -> tuple[np.ndarray, bool]:
    """The shard's bytes, and whether they are exactly the size the manifest lists (else they
    are what arrived: shorter, or up to ``TAIL`` longer). Nothing is allocated beyond the
    listed size (bounded by ``check_manifest``) before the bytes are there."""
    if is_remote(url):  # one GET of at most the listed size + TAIL + 1 bytes
        data = read_head(str(url), entry.bytes + TAIL + 1)
        filled, rest = min(len(data), entry.bytes), data[entry.bytes:]
        buf = _shard_buffer(buffer, entry.bytes)
        buf[:filled] = np.frombuffer(data, np.uint8, filled)
    else:
        _check_local_size(url, entry)
        with open_shard(url) as f:
            buf = _shard_buffer(buffer, entry.bytes)
            filled = read_into(f, memoryview(buf))
            rest = f.read(TAIL + 1)
    if len(rest) > TAIL:
        raise ShardError(url, f"larger than the manifest lists ({entry.bytes} bytes)")
    if rest:
        return np.frombuffer(buf[:filled].tobytes() + rest, np.uint8), False
    return buf[:filled], filled == len(buf)


def _shard_buffer(buffer: np.ndarray | None, nbytes: int) -> np.ndarray:
    """``buffer`` (from a ``BufferPool``) when it holds ``nbytes``, else a fresh one."""
    fits = buffer is not None and len(buffer) >= nbytes
    return buffer[:nbytes] if fits else np.empty(nbytes, np.uint8)


class BufferPool:
    """Byte buffers reused once nothing views them: shards for ``read_shard``, batches for the
    cached loader.

    Filling a fresh buffer costs a page fault per page (on a 2-core VM, a 50 MB batch gathered
    into fresh memory goes at a fifth of the speed of one gathered into reused memory). A
    regular shard's features, and a batch's tensor, are views of their buffer, so a buffer is
    free exactly when this pool holds the only reference to it (CPython reference counts: every
    numpy view, and every tensor made by ``torch.from_numpy``, keeps its base alive). The pool
    holds at most ``limit`` buffers: ``take`` waits for one to come free while ``urgent`` is
    given and not set, else allocates.
    """

    def __init__(self, limit: int = 2, poll_s: float = 0.001):
        self.buffers: list[np.ndarray] = []
        self.limit, self.poll_s = limit, poll_s

    def take(self, nbytes: int, urgent: threading.Event | None = None) -> np.ndarray:
        """A buffer of at least ``nbytes`` that nothing else references."""
        while True:
            free = [i for i in range(len(self.buffers)) if sys.getrefcount(self.buffers[i]) == 2]
            fits = [i for i in free if len(self.buffers[i]) >= nbytes]
            if fits:
                return self.buffers[fits[0]]
            if free or len(self.buffers) < self.limit or urgent is None or urgent.is_set():
                break
            urgent.wait(self.poll_s)  # a shard still in use is let go within a batch or two
        if free:  # too small for this shard: replace it
            del self.buffers[free[0]]
        buffer = np.empty(nbytes, np.uint8)
        self.buffers.append(buffer)
        del self.buffers[:-self.limit]  # over the limit only while the caller insisted
        return buffer


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


def local_path(url: str) -> Path | None:
    """The file a local shard URL (a plain path or ``file:``) names; None for pipes and remotes."""
    url = str(url)
    if url.startswith("file:"):
        return Path(url[len("file://"):] if url.startswith("file://") else url[len("file:"):])
    return None if "://" in url or url.startswith("pipe:") else Path(url)


def _check_local_size(url: str, entry: ShardEntry) -> None:
    """A local shard must be a regular file of the size its manifest lists: checked before it
    is opened or anything is allocated for it."""
    path = local_path(url)
    if path is None:
        return
    try:
        st = path.stat()
    except OSError as exc:
        raise ShardError(url, f"cannot read ({exc})") from exc
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the open, a directory cannot be read
        raise ShardError(url, "is not a regular file")
    _check_size(url, st.st_size, entry)


def _check_size(url, size: int, entry: ShardEntry) -> None:
    if size != entry.bytes:
        raise ShardError(url, f"{size} bytes on disk, the manifest lists {entry.bytes}"
                         + (" (truncated?)" if size < entry.bytes else ""))


class ShardFile:
    """A local shard opened for the cached loader (``open_mapped``): mapped read-only (``view``,
    uint8 ``[entry.bytes]``) and kept open, so that rows are read from it with ``preadv``
    (``read_row``).

    The mapping is for the headers (``read_regular`` checks them through it, touching a few
    pages a sample); the rows never go through it: a read copies from the page cache straight
    into the batch, where copying out of the mapping also paid for making and unmaking a page
    table entry per 4 KiB (0.66 of a raw warm read where reads reach 0.79, on a 2-core VM;
    alternating rounds). So a shard truncated in place once its headers were checked gives a
    ShardError naming it, not a fault (``read_shard`` walks an irregular shard from a read, not
    through the mapping); bombkd never writes a shard in place (a temporary name, then a
    rename). The file is closed when nothing refers to it.
    """

    def __init__(self, url, fd: int, view: np.ndarray):
        self.url, self.fd, self.view, self._base = url, fd, view, view.ctypes.data
        weakref.finalize(self, os.close, fd)

    def read_row(self, row: np.ndarray, out: np.ndarray) -> None:
        """Read ``row`` (a contiguous view of ``view``) into ``out`` (as many bytes)."""
        if out.nbytes != row.nbytes:
            raise ValueError(f"a row of {row.nbytes} bytes does not fit {out.nbytes}")
        into, offset, got = memoryview(out).cast("B"), row.ctypes.data - self._base, 0
        while got < row.nbytes:
            try:
                n = os.preadv(self.fd, [into[got:]], offset + got)
            except OSError as exc:
                raise ShardError(self.url, f"cannot read ({exc})", fix=REPAIR_NOW) from exc
            if n <= 0:
                raise ShardError(self.url, SHRUNK, fix=REPAIR_NOW)
            got += n


def open_mapped(url, path: Path, entry: ShardEntry) -> ShardFile | None:
    """``path`` as a ``ShardFile``, its pages that are not in the page cache read in first
    (``_make_resident``), or None where its file system cannot map it (some FUSE mounts: the
    caller reads the shard instead). It must be a regular file of the size the manifest lists:
    checked before it is opened (a FIFO would block) and again on the open file, before
    anything is mapped. Errors are ShardErrors naming the shard."""
    _check_local_size(url, entry)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ShardError(url, f"cannot read ({exc})") from exc
    try:
        _check_size(url, os.fstat(fd).st_size, entry)  # the file opened is the one checked
        try:
            view = np.frombuffer(mmap.mmap(fd, entry.bytes, prot=mmap.PROT_READ), np.uint8)
        except (OSError, ValueError):
            os.close(fd)
            return None
        _make_resident(url, fd, view)
    except BaseException as exc:
        os.close(fd)
        if isinstance(exc, OSError):
            raise ShardError(url, f"cannot read ({exc})") from exc
        raise
    return ShardFile(url, fd, view)


def _make_resident(url, fd: int, view: np.ndarray) -> None:
    """Read the pages of mapped ``view`` (of file ``fd``) that are not in the page cache, each
    run of them in sequential ``CHUNK`` reads into one scratch buffer: the disk's speed, where
    faulting a cold mapping in reads ahead only a little at a time (half the speed on a 2-core
    VM). Pages already cached cost nothing (``mincore``)."""
    pages = np.flatnonzero(~_resident(view))
    if not pages.size:
        return
    breaks = np.flatnonzero(np.diff(pages) > 1)
    starts, ends = pages[np.r_[0, breaks + 1]], pages[np.r_[breaks, len(pages) - 1]] + 1
    scratch = memoryview(bytearray(CHUNK))
    for start, end in zip(starts * mmap.PAGESIZE, np.minimum(ends * mmap.PAGESIZE, len(view))):
        offset, end = int(start), int(end)
        while offset < end:
            n = os.preadv(fd, [scratch[:min(CHUNK, end - offset)]], offset)
            if n <= 0:
                raise ShardError(url, SHRUNK, fix=REPAIR_NOW)
            offset += n


def _resident(view: np.ndarray) -> np.ndarray:
    """Per page of mapped ``view``: is it in the page cache (``mincore``; all False where the
    C library has none, so that everything is read)."""
    pages = np.zeros(-(-len(view) // mmap.PAGESIZE), np.uint8)
    mincore = _mincore()
    if mincore is not None and len(view) and mincore(view.ctypes.data, len(view),
                                                     pages.ctypes.data) != 0:
        pages[:] = 0
    return (pages & 1).astype(bool)


@functools.cache
def _mincore():
    try:
        fn = ctypes.CDLL(None, use_errno=True).mincore
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p], ctypes.c_int
    return fn


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
