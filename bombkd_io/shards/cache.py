"""The local shard cache (``--shard-cache DIR --shard-cache-limit SIZE``): remote shards kept on
local disk for epochs 2+.

``ShardCache.fetch(url, entry)`` returns a local file holding shard ``entry`` of a remote cache:
the one kept from an earlier epoch (or another rank of this node), else downloaded now -
streamed in large reads to a temporary name while hashed, checked against the manifest's size
and sha256 (once, here), then renamed into place. So epoch 2 of a cache that fits reads nothing
remote. Each remote root gets its own subfolder (a hash of its URL), so two caches with the same
shard names never meet. Several ranks of one node may share the folder: a shard is downloaded
under a lock of its own (the others wait, then find it there), and the eviction runs under a
lock of the folder. Eviction is least recently used (a hit touches the file's mtime) and keeps
the total under the limit, but never removes a shard used in the last ``IN_USE_S`` seconds:
``fetch`` returns a path that this or another rank is about to open, so for that while the
folder may hold more than the limit.
"""
from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

from bombkd_io.atomic import discard, temp_path
from bombkd_io.errors import ConfigError, ShardError
from bombkd_io.lock import waiting_lock
from bombkd_io.shards.manifest import ShardEntry
from bombkd_io.storage import open_remote, retrying

UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
DOWNLOAD_BLOCK = 16 << 20  # bytes per read (one ranged GET each) while downloading
IN_USE_S = 60.0  # a shard fetched or hit this recently may be being read: never evicted


def parse_size(text: str, argument: str = "--shard-cache-limit") -> int:
    """``"50G"``, ``"800M"``, ``"1.5T"``, ``"123456"`` (bytes; K/M/G/T are powers of 1024)."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ConfigError(f"{argument} {text!r}: not a size; write bytes or a number with K, M, "
                          "G or T (50G)")
    return int(float(match[1]) * UNITS[match[2].upper()])


class ShardCache:
    """Verified local copies of remote shards under ``folder``, at most ``limit`` bytes (None:
    no limit). Holds only paths and numbers: it crosses to loader workers as is."""

    def __init__(self, folder: str | Path, limit: int | None = None):
        self.folder, self.limit = Path(folder), limit
        self.downloads = 0  # shards downloaded by this process (tests and benchmarks read it)

    def fetch(self, url: str, entry: ShardEntry) -> Path:
        """A local file with exactly ``entry``'s bytes; ShardError naming ``url`` when the
        download does not verify or keeps failing (after ``storage.retrying``'s retries)."""
        where = self.folder / hashlib.sha256(url.rsplit("/", 1)[0].encode()).hexdigest()[:16]
        where.mkdir(parents=True, exist_ok=True)
        path = where / entry.name  # a checked shard name (check_manifest), no path in it
        with waiting_lock(where / f".{entry.name}.lock"):
            if _size(path) == entry.bytes:
                os.utime(path)  # most recently used
                return path
            retrying(lambda: self._download(url, entry, path), url)
            self.downloads += 1
        if self.limit is not None:
            self.evict(keep=path)
        return path

    def _download(self, url: str, entry: ShardEntry, path: Path) -> None:
        tmp, digest, size = temp_path(path), hashlib.sha256(), 0
        try:
            with open_remote(url) as src, open(tmp, "wb") as dst:
                if src.size != entry.bytes:
                    raise ShardError(url, f"{src.size} bytes, the manifest lists {entry.bytes}")
                while chunk := src.read(DOWNLOAD_BLOCK):
                    digest.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
            if size != entry.bytes or (entry.sha256 and digest.hexdigest() != entry.sha256):
                raise ShardError(url, f"downloaded {size} bytes, sha256 "
                                 f"{digest.hexdigest()[:12]}...; the manifest lists "
                                 f"{entry.bytes} bytes, {entry.sha256[:12]}...")
            os.replace(tmp, path)
        finally:
            discard(tmp)

    def evict(self, keep: Path | None = None, in_use_s: float | None = None) -> list[Path]:
        """Remove the least recently used shards until the total fits the limit, but none used
        in the last ``in_use_s`` seconds (default ``IN_USE_S``), nor ``keep``; the removed."""
        in_use_s = IN_USE_S if in_use_s is None else in_use_s
        removed: list[Path] = []
        with waiting_lock(self.folder / ".evict.lock"):
            files = [(st.st_mtime, st.st_size, p) for p in self.folder.glob("*/*.tar")
                     if (st := _stat(p)) is not None]
            total = sum(size for _, size, _ in files)
            now = time.time()
            for mtime, size, path in sorted(files):
                if total <= self.limit:
                    break
                if path == keep or now - mtime < in_use_s:
                    continue
                with waiting_lock(path.parent / f".{path.name}.lock"):
                    path.unlink(missing_ok=True)
                total -= size
                removed.append(path)
        return removed


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:  # evicted by another rank meanwhile
        return None


def _size(path: Path) -> int | None:
    st = _stat(path)
    return None if st is None else st.st_size
