"""Loader worker processes end with the process that started them, however it ends.

A DataLoader worker of a parent killed with SIGKILL is re-parented and can block for good in
its queue's feeder thread (writing to a pipe no one reads, the read end still open in its
siblings). ``DieWithParent`` is a ``worker_init_fn`` that asks Linux to SIGKILL the worker when
its parent dies (``prctl(PR_SET_PDEATHSIG)``), then checks the parent did not die before that.
Elsewhere it does nothing but run the ``worker_init_fn`` it wraps.

A worker also ignores the signals that ask a run to stop (SIGINT, SIGTERM, SIGUSR1): a
terminal's Ctrl-C and a scheduler's preemption signal reach every process of the job, and a
worker that died of one would fail the batch the parent is finishing before its checkpoint. The
parent decides when to stop; its workers end with it.

Linux sends the signal when the *thread* that started the worker ends: start the workers
(iterate the DataLoader) from a thread that lives as long as they are needed, the main thread
in bombkd.

Because workers ignore SIGTERM, multiprocessing's own exit hook (terminate, then join every
child) would wait for a worker that is still alive at exit forever: a worker the DataLoader did
not stop (persistent workers, or an iterator not collected before exit). ``track`` the workers
a loader starts; at exit those still alive are killed first (they would die with the process a
moment later anyway).
"""
from __future__ import annotations

import atexit
import ctypes
import os
import signal
import sys
import weakref
from collections.abc import Callable, Iterable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_TRACKED: weakref.WeakSet = weakref.WeakSet()  # worker processes to kill at exit if alive


def die_with_parent(parent: int) -> None:
    """Have this process killed when its parent ends; exit now if the parent (pid ``parent``)
    has already gone (it died before the request was made)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # re-parented already: nothing would send the signal
        os._exit(1)


class DieWithParent:
    """``worker_init_fn``: ``die_with_parent``, ignore the stop signals, then ``then(worker_id)``
    if given.

    Made in the process that starts the workers (it records that PID); picklable when ``then``
    is, so it works with any multiprocessing start method.
    """

    def __init__(self, then: Callable[[int], None] | None = None):
        self.parent, self.then = os.getpid(), then

    def __call__(self, worker_id: int) -> None:
        die_with_parent(self.parent)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
        if self.then is not None:
            self.then(worker_id)


def track(processes: Iterable) -> None:
    """Kill these worker processes (``multiprocessing.Process``) at exit if they are still
    alive, before multiprocessing joins them (see the module docstring)."""
    if not _TRACKED:
        # registered after multiprocessing's hook (imported by now), so it runs before it
        atexit.unregister(_kill_tracked)
        atexit.register(_kill_tracked)
    _TRACKED.update(processes)


def _kill_tracked() -> None:
    for process in list(_TRACKED):
        if process.is_alive():
            process.kill()
            process.join()
