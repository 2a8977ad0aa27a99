"""What every command does with a bad input: one line on stderr and exit code 2.

That includes a command that needs an optional dependency which is not installed: ``Commands``
(the app's group class) turns a ``MissingExtraError`` raised anywhere in a command, at an import
as well, into the one line naming the ``bombkd[...]`` extra to install."""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import typer
from typer.core import TyperGroup

from bombkd_io.atomic import is_disk_full, write_failed
from bombkd_io.errors import BombkdError, MissingExtraError

EXIT_BAD_INPUT = 2


def fail(message: str) -> typer.Exit:
    """Print ``error: <message>`` to stderr and return the Exit to raise (``raise fail(...)``)."""
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(code=EXIT_BAD_INPUT)


def names(values: list[str] | None) -> list[str]:
    """The names of a list option that takes comma-separated names and may be repeated:
    ``--teachers a,b --teachers c`` -> ``["a", "b", "c"]`` (blanks dropped)."""
    return [n.strip() for value in values or [] for n in value.split(",") if n.strip()]


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a ``BombkdError`` (or a full disk) raised inside the block into
    ``error: <message>`` and exit code 2.

    Use as ``with user_errors(): library_call(...)`` in a command body; other exceptions (bugs)
    keep their traceback.
    """
    try:
        yield
    except BombkdError as exc:
        raise fail(str(exc)) from exc
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        # every output is written under a temporary name first: nothing finished is lost
        error = write_failed(exc.filename or "the output", exc, "free some space and run the "
                             "same command again (featurize: with --resume; train: --resume)")
        raise fail(str(error)) from exc


class Commands(TyperGroup):
    """The ``bombkd`` group: a command that imports an extra that is not installed fails with
    ``error: <what needs it>: pip install 'bombkd[<extra>]'`` and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MissingExtraError as exc:
            raise fail(str(exc)) from exc
