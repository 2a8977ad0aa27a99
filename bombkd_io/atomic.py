"""Atomic file output: write to a temporary name in the same folder, then rename over the target.

A reader (or a crash) sees the old file or the whole new one, never half of one. ``atomic_path``
is the one way bombkd writes a finished output file; ``commit`` and ``discard`` are its two ends,
for writers that keep a temporary file open across calls (the shard writer).
"""
from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

_COUNTER = itertools.count()  # temp names unique within a process (threads), pid across processes


def temp_path(path: str | Path) -> Path:
    """A hidden temporary name beside ``path``, ending in the same suffix (so writers that pick a
    format from the extension, like PyAV and Pillow, still do)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}-{next(_COUNTER)}{path.suffix}")


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def commit(tmp: str | Path, path: str | Path) -> None:
    """fsync the finished ``tmp``, rename it to ``path``, fsync the folder."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def discard(tmp: str | Path) -> None:
    """Remove a temporary file that will not be committed (gone already is fine)."""
    Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write ``path``'s content to; on a clean exit it replaces
    ``path`` (fsynced), on an error it is removed and ``path`` is left as it was.

    >>> with atomic_path(out) as tmp:
    ...     tmp.write_text("done")
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        commit(tmp, path)
    except BaseException:
        discard(tmp)
        raise
