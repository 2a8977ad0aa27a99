"""Atomic file output: write to a temporary name in the same folder, then rename over the target.

A reader (or a crash) sees the old file or the whole new one, never half of one. ``atomic_path``
is the one way bombkd writes a finished output file; ``commit`` and ``discard`` are its two ends,
for writers that keep a temporary file open across calls (the shard writer). A process killed
mid-write (kill -9) leaves its hidden temporary file; ``remove_temps`` is how the next run that
holds the folder's lock (``bombkd_io.lock``) clears the ones of its own files.
"""
from __future__ import annotations

import contextlib
import errno
import fnmatch
import itertools
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from bombkd_io.errors import OutputError

_COUNTER = itertools.count()  # temp names unique within a process (threads), pid across processes
_TEMP_RE = re.compile(r"\.(?P<stem>.+)\.tmp-\d+-\d+(?P<suffix>(?:\.[^.]*)?)")  # temp_path's names


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


def folder_problem(folder, argument: str) -> str | None:
    """Why ``folder`` cannot be an output folder (it exists and is not a directory), or None.
    The one check for ``--out`` / ``--save-dir``, run before any work."""
    if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
        return f"{argument} {folder}: exists and is not a directory; pass a folder"
    return None


def format_bytes(n: float) -> str:
    """``1234567`` -> ``"1.2 MB"``: a size in the unit that fits (decimal, like ``df -H``)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def write_failed(path: str | Path, exc: BaseException, fix: str) -> OutputError:
    """The error for an output that could not be written: where, why, the free space, the fix."""
    folder = Path(path).parent
    try:
        free = f"; {format_bytes(shutil.disk_usage(folder).free)} free there"
    except OSError:
        free = ""
    why = "no space left on the device" if is_disk_full(exc) else \
        (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    error = OutputError(f"cannot write {path}: {why}{free}; {fix}")
    error.errno = errno.ENOSPC if is_disk_full(exc) else errno.EIO
    return error


def temp_target(name: str) -> str | None:
    """The file name a ``temp_path`` name stands for (``.a.tmp-12-0.pt`` -> ``a.pt``); None for
    a name ``temp_path`` does not make."""
    m = _TEMP_RE.fullmatch(name)
    return m["stem"] + m["suffix"] if m else None


def remove_temps(folder: str | Path, patterns: list[str]) -> list[Path]:
    """Remove the temporary files of ``atomic_path`` writes into ``folder`` whose target name
    matches one of ``patterns`` (``fnmatch``: ``fusion_ep*.pt``); returns the removed paths.

    Only for a caller holding the folder's lock (``bombkd_io.lock``): then no other run writes
    those files, and every such temporary file is left over from a killed one.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        target = temp_target(path.name)
        if target and any(fnmatch.fnmatchcase(target, p) for p in patterns) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
