"""One run per output folder: an advisory lock file that a second run finds held.

``lock_folder(folder, argument=...)`` takes ``fcntl.flock`` on ``folder/.NAME.lock`` without
waiting; a second run gets a ``FolderBusyError`` naming the folder, the PID that holds it and the
fix. The kernel drops a flock when its holder dies (even by kill -9), so a lock file a killed run
left behind never blocks anyone: the next run takes it. ``release`` removes the file, so a
finished run leaves the folder as it would be without locking; a folder the lock had to create
is removed again if the run left it empty.

While it holds the lock, a run owns its kind of files in the folder: temporary files of those
kinds (``bombkd_io.atomic.remove_temps``) are leftovers of a killed run, never a live write.
``waiting_lock(path)`` is the other kind: a short critical section that several processes take
in turn (the shard cache's download of one shard, its eviction), waiting for each other.

A forked child shares its parent's lock; bombkd's loader workers die with their parent
(``bombkd_io.workers``), so none keeps a killed run's lock.
"""
from __future__ import annotations

import contextlib
import errno
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

from bombkd_io.atomic import folder_problem
from bombkd_io.errors import ConfigError, FolderBusyError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None

# flock is not supported on this filesystem (some network filesystems): run unlocked, warned
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class FolderLock:
    """A held lock on one folder (from ``lock_folder``); ``release()`` (or ``with``) ends it."""

    def __init__(self, path: Path, fd: int | None, created: list[Path]):
        self.path, self.fd, self.created = path, fd, created
        self.held = True

    def release(self) -> None:
        """Remove the lock file and unlock; then remove folders the lock made if still empty.
        Safe to call twice."""
        if not self.held:
            return
        self.held = False
        if self.fd is not None:
            try:
                # unlinked while still held: a run that opened the old file re-checks it
                self.path.unlink(missing_ok=True)
            finally:
                os.close(self.fd)
        _remove_empty(self.created)

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_folder(folder: str | Path, *, argument: str, name: str = "bombkd") -> FolderLock:
    """Take the lock ``folder/.{name}.lock`` (creating ``folder`` if needed) or raise
    ``FolderBusyError``; ``argument`` is the option the folder came from (``--save-dir``)."""
    folder = Path(folder)
    created = _make_folder(folder, argument)
    path = folder / f".{name}.lock"
    try:
        fd = _acquire(folder, path, argument, created) if fcntl is not None else None
    except BaseException:
        _remove_empty(created)
        raise
    return FolderLock(path, fd, created)


def _acquire(folder: Path, path: Path, argument: str, created: list[Path]) -> int:
    """An open, locked descriptor of ``path`` holding this PID."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # a run that created the folder removed it again: re-make it
            created += [f for f in _make_folder(folder, argument) if f not in created]
            continue
        try:
            if _flock(fd, path, argument) and _is_current(fd, path):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder released and unlinked it between our open and our flock


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (innermost first) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (the run wrote something) or already gone


def _make_folder(folder: Path, argument: str) -> list[Path]:
    """Create ``folder`` and its missing parents; the ones created, innermost first."""
    if problem := folder_problem(folder, argument):
        raise ConfigError(problem)
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a parent is a file
        raise ConfigError(f"{argument} {folder}: a parent folder is a file; pass a folder") \
            from None
    return missing


def _flock(fd: int, path: Path, argument: str) -> bool:
    """Lock ``fd`` without waiting: True when held (or unsupported here, warned); raises
    ``FolderBusyError`` when another run holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        holder = _holder(fd)
        who = f"PID {holder}" if holder else "another process"
        raise FolderBusyError(
            f"{argument} {path.parent}: another bombkd run ({who}) is writing into this folder "
            f"(it holds {path.name}); wait for it to finish, or pass another {argument}") from None
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
        warnings.warn(f"{path.parent}: this filesystem does not support file locks ({exc}); "
                      "nothing stops a second run from writing into the same folder",
                      stacklevel=4)
        return True


def _is_current(fd: int, path: Path) -> bool:
    """Whether the locked ``fd`` is still the file at ``path`` (not one a releasing run
    unlinked after we opened it)."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


def _holder(fd: int) -> int | None:
    """The PID the holder wrote into the lock file (None while it has not yet)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


@contextlib.contextmanager
def waiting_lock(path: str | Path) -> Iterator[None]:
    """Hold ``fcntl.flock`` on ``path`` (created if missing, never removed: removing it would
    let two processes lock two different files) for the block, waiting while another holds it."""
    if fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
        yield
    finally:
        os.close(fd)  # closing drops the lock
