"""Checkpoints: the kinds bombkd writes, and how every one is saved and loaded.

A checkpoint is a plain dict of tensors and primitives that opens with ``checkpoint_header(kind)``
and loads with ``torch.load(weights_only=True)``, so one from a stranger cannot run code. Writes go
to a temporary name in the same folder and are renamed, so an interrupted run never leaves a
half-written file under the final name. What each kind holds besides its header is written by
its maker: ``Trainer.save`` (fusion) and ``converters_checkpoint`` (converters).

A training run's save dir holds epoch checkpoints (``fusion_ep{N}.pt``: N epochs done) and step
checkpoints (``fusion_ep{N}_step{S}.pt``: global step S, within epoch N). ``run_checkpoints``
lists them oldest first, ``newest_valid`` picks the one ``--resume`` continues from, and
``prune_steps`` keeps the last ``--keep`` step checkpoints.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import torch

from bombkd_io.atomic import atomic_path, write_failed
from bombkd_io.errors import ConfigError, DataWarning, FormatError

FUSION_KIND = "bombkd-fusion"          # `bombkd train`: the head, optimizer, RNG, config, plan
CONVERTERS_KIND = "bombkd-converters"  # `bombkd train-converters`: one converter per teacher
VERSIONS = {FUSION_KIND: 1, CONVERTERS_KIND: 1}  # the layout of each kind this bombkd writes
# fusion_ep{N}.pt (end of epoch N) and fusion_ep{N}_step{S}.pt (global step S, within epoch N)
RUN_CHECKPOINT_RE = re.compile(r"^fusion_ep(\d+)(?:_step(\d+))?\.pt$")


def checkpoint_header(kind: str) -> dict[str, Any]:
    """The keys every checkpoint opens with: its kind and the version of that kind's layout."""
    return {"format": kind, "version": VERSIONS[kind]}


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> Path:
    """Write ``obj`` to ``path`` atomically: a temporary file in its folder, then a rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(obj, f)  # through our file object: a failed write keeps its OSError
    except (OSError, RuntimeError) as exc:  # torch wraps a failed write in a RuntimeError
        cause = exc.__context__ if isinstance(exc.__context__, OSError) else exc
        raise write_failed(path, cause, "free some space (or pass another --save-dir) and run "
                           "again with --resume; earlier checkpoints are intact") from exc
    return path


def checkpoint_in(path: Path, *, kind: str, argument: str) -> Path:
    """``path`` itself, or the checkpoint in the directory ``path``: its only ``*.pt`` file, or
    the one named after the kind (``converters.pt``). ConfigError naming ``argument`` otherwise."""
    if path.is_dir():
        found = sorted(path.glob("*.pt"))
        named = [p for p in found if p.name == kind.removeprefix("bombkd-") + ".pt"]
        if named or len(found) == 1:
            return (named or found)[0]
        listing = ", ".join(p.name for p in found[:5]) + (", ..." if len(found) > 5 else "")
        held = (f"holds {len(found)} .pt files ({listing}); pass one of them" if found
                else f"holds no .pt file; pass the path of a {kind} checkpoint")
        raise ConfigError(f"{argument} {path}: a directory that {held}")
    if not path.is_file():
        raise ConfigError(f"{argument} {path}: no such file; pass the path of a {kind} checkpoint "
                          "or the directory holding it")
    return path


def load_checkpoint(path: str | Path, *, kind: str, argument: str) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` and check that it holds a ``kind``
    of the version this bombkd writes.

    ``argument`` names the option the path came from, so the error tells the user what to fix.
    Raises ``ConfigError`` for a missing file and ``FormatError`` for a file of another kind.
    """
    path = checkpoint_in(Path(path), kind=kind, argument=argument)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        # not torch's own unpickling text: it suggests weights_only=False, which runs code
        reason = ("not a torch file of tensors and plain data" if isinstance(exc, UnpicklingError)
                  else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        raise FormatError(f"{argument} {path}: cannot be read as a checkpoint ({reason}); "
                          f"pass a file written by bombkd") from exc
    if not isinstance(obj, dict) or obj.get("format") != kind:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise FormatError(f"{path}: expected a {kind!r} checkpoint, found {found!r}; "
                          f"check {argument}")
    if obj.get("version") != VERSIONS[kind]:
        raise FormatError(f"{path}: {kind} checkpoint version {obj.get('version')!r} is not "
                          f"supported (expected {VERSIONS[kind]}); re-create it with this bombkd")
    return obj


def run_checkpoints(save_dir: Path) -> list[Path]:
    """The run's checkpoints in ``save_dir``, oldest first: within epoch N its step checkpoints
    by step, then ``fusion_ep{N}.pt`` (written after any step checkpoint of the epoch)."""
    def order(path: Path) -> tuple[int, int, int]:
        epoch, step = RUN_CHECKPOINT_RE.match(path.name).groups()
        return (int(epoch), 0, int(step)) if step else (int(epoch), 1, 0)
    return sorted((p for p in save_dir.glob("fusion_ep*.pt") if RUN_CHECKPOINT_RE.match(p.name)),
                  key=order)


def is_step_checkpoint(path: Path) -> bool:
    return "_step" in path.name


def newest_valid(paths: list[Path], *, kind: str, argument: str) -> tuple[Path, dict] | None:
    """The newest of ``paths`` (oldest first) that loads, with its contents; each newer one that
    does not (half-written, corrupt) is reported with a ``DataWarning`` and passed over."""
    for path in reversed(paths):
        try:
            return path, load_checkpoint(path, kind=kind, argument=argument)
        except FormatError as err:
            warnings.warn(f"{err}; resuming from the checkpoint before it", DataWarning,
                          stacklevel=2)
    return None


def prune_steps(save_dir: Path, keep: int) -> list[Path]:
    """Delete all but the last ``keep`` step checkpoints in ``save_dir``; returns those deleted.
    Epoch checkpoints are kept."""
    steps = [p for p in run_checkpoints(save_dir) if is_step_checkpoint(p)]
    gone = steps[:max(0, len(steps) - keep)]
    for path in gone:
        path.unlink(missing_ok=True)
    return gone
