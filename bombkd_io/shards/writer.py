"""Write one model's shard set, ``{dataset}-{split}-{model}-{k:06d}.tar``: ``ShardSetWriter``
encodes each sample's members with ``codec.py`` and streams them through ``webdataset.TarWriter``
into shards of ``shard_size`` samples.

A shard is written to its name plus ``.tmp`` (``...-000003.tar.tmp``, beside it: ``temp_shard``;
``remove_temp_shards`` clears the ones a killed run left, and the manifest's "unfinished run"
message looks for them) and committed with ``atomic.commit`` (fsync, rename) when complete, so a
finished name is always a whole shard; its size and sha256 are taken while writing. Tar bytes are
deterministic (fixed mtime, owner and mode): the same features give the same sha256.
"""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import numpy as np
import numpy.typing as npt
import webdataset as wds

from bombkd_io.atomic import commit, discard, folder_problem
from bombkd_io.errors import ConfigError, ShardError
from bombkd_io.names import KEY_RE, name_problems, shard_name
from bombkd_io.shards.codec import DTYPES, encode_label, encode_meta, encode_tensor
from bombkd_io.shards.manifest import ShardEntry

TAR_NAME_MAX = 100  # ustar name field; longer member names would need a prefix split at "/"
TEMP_SUFFIX = ".tmp"  # a shard being written: its final name plus this


def temp_shard(path: Path) -> Path:
    """Where the shard ``path`` is written until it is complete: beside it, ``TEMP_SUFFIX`` added."""
    return path.with_name(path.name + TEMP_SUFFIX)


def remove_temp_shards(root, dataset: str, split: str, model: str) -> None:
    """Remove the half-written shards of one model's set that a killed writer left in ``root``.
    Only for a caller holding the folder's lock (``bombkd_io.lock``): no other run writes them."""
    for tmp in Path(root).glob(f"{dataset}-{split}-{model}-*.tar{TEMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)


def check_key(key: str, model: str) -> None:
    """Keys are ``[A-Za-z0-9_-]+`` (no dots: webdataset splits the member name at the first one)."""
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise ShardError(model, f"sample key {key!r} must match {KEY_RE.pattern} (no dots)",
                         fix="sanitise the key (bombkd_io.datasets.item_key does)")
    if len(f"{key}.{model}.mp") > TAR_NAME_MAX:
        raise ShardError(model, f"sample key {key!r} is too long for a tar member name "
                                f"({TAR_NAME_MAX} characters with '.{model}.mp')",
                         fix="use a shorter key")


class _HashingFile:
    """File wrapper that counts and hashes the bytes written through it."""

    def __init__(self, path: Path):
        self.file = open(path, "wb")
        self.sha256, self.bytes = hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.file.write(data)

    def close(self) -> None:
        self.file.close()  # durability (fsync) is atomic.commit's, only for a finished shard


class ShardSetWriter:
    """Streams one model's samples into shards of ``shard_size`` samples.

    ``write(key, features, extra)``: ``features`` ``[T', D]`` is cast to ``dtype``; ``extra`` for
    the student set is ``{"cls": int, "json": {...}}``. ``close()`` returns the finished
    ``ShardEntry`` list for the manifest. ``start_shard`` continues a set (``--resume``).
    """

    def __init__(self, root: str | Path, dataset: str, split: str, model: str, shard_size: int,
                 dtype: str = "float16", *, start_shard: int = 0):
        problems = name_problems((dataset, "dataset"), (split, "split"), (model, "model"))
        if problem := folder_problem(root, "--out"):
            problems.append(problem)
        if dtype not in DTYPES:
            problems.append(f"dtype {dtype!r} must be one of {sorted(DTYPES)}")
        if shard_size < 1:
            problems.append(f"shard_size must be >= 1, got {shard_size}")
        if problems:
            raise ConfigError(problems)
        self.root, self.model, self.shard_size, self.dtype = Path(root), model, shard_size, dtype
        self.prefix = (dataset, split)
        self.shape: tuple[int, ...] | None = None
        self.entries: list[ShardEntry] = []
        self._next, self._tar, self._file, self._count = start_shard, None, None, 0
        self.root.mkdir(parents=True, exist_ok=True)

    def write(self, key: str, features: npt.ArrayLike, extra: dict | None = None) -> None:
        """Append sample ``key``: ``features`` ``[T', D]`` (stored in the set's dtype; a value it
        cannot hold is an error naming the sample), and for the student ``extra``
        ``{"cls": label, "json": metadata}``; a full shard is closed and the next one begun."""
        check_key(key, self.model)
        source = np.asarray(features)
        with np.errstate(over="ignore"):  # overflow is checked just below, naming the sample
            array = source.astype(DTYPES[self.dtype], copy=False)
        if array.dtype != source.dtype and not np.isfinite(array).all() \
                and np.isfinite(source).all():
            raise ShardError(self._path(self._next), f"features overflow {self.dtype} (largest "
                             f"magnitude {np.abs(source).max():.3g})", sample=key,
                             fix="store float32 features (featurize without --fp16)")
        if self.shape is None:
            self.shape = array.shape
        elif array.shape != self.shape:
            raise ShardError(self._path(self._next), f"features of shape {array.shape}; this "
                             f"set holds {self.shape}", sample=key, fix="check the backbone")
        sample = {"__key__": key, f"{self.model}.mp": encode_tensor(array)}
        for name, value in (extra or {}).items():
            sample[name] = _encode_extra(name, value)
        if self._tar is None:
            self._open()
        self._tar.write(sample)
        self._count += 1
        if self._count == self.shard_size:
            self._finish()

    def close(self) -> list[ShardEntry]:
        """Finish the last (partial) shard; the entries of every shard this writer made."""
        if self._tar is not None:
            self._finish()
        return list(self.entries)

    def abort(self) -> None:
        """Drop the shard being written (its temp file); finished shards stay."""
        tar, self._tar = self._tar, None
        if tar is None:
            return
        try:  # closing can fail too (a full disk): the shard is dropped whatever happens
            with contextlib.suppress(OSError):
                tar.close()
            with contextlib.suppress(OSError):
                self._file.close()
        finally:
            discard(self._tmp)

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _path(self, k: int) -> Path:
        return self.root / shard_name(*self.prefix, self.model, k)

    def _open(self) -> None:
        path = self._path(self._next)
        self._tmp = temp_shard(path)
        self._file = _HashingFile(self._tmp)
        # mtime/owner/mode fixed so identical features give identical bytes (and sha256).
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0, user="bombkd",
                                  group="bombkd", mode=0o444)
        self._count = 0

    def _finish(self) -> None:
        self._tar.close()
        self._file.close()
        path = self._path(self._next)
        commit(self._tmp, path)
        self.entries.append(ShardEntry(path.name, self._count, self._file.bytes,
                                       self._file.sha256.hexdigest()))
        self._tar, self._next = None, self._next + 1


def _encode_extra(name: str, value) -> bytes:
    if name == "cls":
        return encode_label(value)
    if name == "json":
        return encode_meta(value)
    raise ShardError(name, f"unknown extra member {name!r}; a sample carries 'cls' and 'json'",
                     fix="pass extra={'cls': label, 'json': {...}}")
