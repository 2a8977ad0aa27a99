"""Where a loader stands in its epochs, saved and restored: ``EpochCursor``, the part of both
loaders' ``state_dict`` / ``load_state_dict`` (the convention of torchdata's StatefulDataLoader).

The state is small because the plan is a pure function (``bombkd_io.sampling``): the epoch, the
batches of it already handed to the consumer, the samples skipped so far, and the plan's inputs,
checked on load so that a state is never replayed over another plan:

    {"version": 1, "epoch": int, "batch": int,
     "plan": {"seed", "num_samples", "shard_size", "batch_size", "world_size"}, "skipped": int}
"""
from __future__ import annotations

from collections.abc import Callable

from bombkd_io.errors import ConfigError
from bombkd_io.sampling import check_plan

STATE_VERSION = 1
STATE_KEYS = ("version", "epoch", "batch", "plan", "skipped")


class EpochCursor:
    """The epoch, the batch the next iteration starts at, and the batches handed out so far.

    ``set_epoch`` to the same epoch keeps a loaded start, to another resets it; an iteration
    takes the start (``begin``), and later iterations start at 0.
    """

    def __init__(self):
        self.epoch, self.start, self.batch, self.skipped = 0, 0, 0, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = self.batch = self.skipped = 0
        self.epoch = epoch

    def begin(self) -> int:
        """The first batch of the iteration that starts now (then 0 for the next one)."""
        start, self.start = self.start, 0
        self.batch = start
        return start

    def state_dict(self, plan: dict, skipped: int) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "batch": self.batch,
                "plan": dict(plan), "skipped": skipped}

    def load_state_dict(self, state: dict, plan: dict, num_batches: Callable[[int], int], *,
                        where: str = "") -> None:
        """Check ``state`` against this loader's ``plan`` (``ConfigError`` naming every
        difference) and its batch against ``num_batches(epoch)``, then start the next
        iteration at its epoch and batch."""
        at = f"{where}: " if where else ""
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise ConfigError(f"{at}a loader state needs {list(STATE_KEYS)}; this one lacks "
                              f"{missing}")
        if state["version"] != STATE_VERSION:
            raise ConfigError(f"{at}loader state version {state['version']!r} is not known; "
                              f"expected {STATE_VERSION}")
        check_plan(state["plan"], plan, where=where)
        batch, epoch = int(state["batch"]), int(state["epoch"])
        if batch < 0 or epoch < 0:
            raise ConfigError(f"{at}a loader state's epoch and batch are >= 0, got epoch "
                              f"{epoch}, batch {batch}")
        if batch > num_batches(epoch):
            raise ConfigError(f"{at}batch {batch} is past the {num_batches(epoch)} batches of "
                              f"epoch {epoch}")
        self.epoch, self.start, self.batch = epoch, batch, batch
        self.skipped = int(state["skipped"])
