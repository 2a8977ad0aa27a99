"""What every command does with a bad input: one line on stderr and exit code 2.

That includes a command that needs an optional dependency which is not installed: ``Commands``
(the app's group class) turns a ``MissingExtraError`` raised anywhere in a command, at an import
as well, into the one line naming the ``bombkd[...]`` extra to install. It also reads the seed's
spellings (``--teachers a b c``, space-separated) before click parses the command line.

The options every command spells the same way live here: ``Device`` (one ``--device``, default
auto), ``Quiet`` and ``show_progress`` (bars only on a terminal)."""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Annotated

import torch
import typer
from typer.core import TyperGroup

from bombkd_io.atomic import is_disk_full, write_failed
from bombkd_io.errors import BombkdError, ConfigError, MissingExtraError
from bombkd_io.video.route import is_cuda
from bombkd_train.backbones import list_backbones

EXIT_BAD_INPUT = 2


def fail(message: str) -> typer.Exit:
    """Print ``error: <message>`` to stderr and return the Exit to raise (``raise fail(...)``)."""
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(code=EXIT_BAD_INPUT)


def names(values: list[str] | None) -> list[str]:
    """The names of a list option that takes comma-separated names and may be repeated:
    ``--teachers a,b --teachers c`` -> ``["a", "b", "c"]`` (blanks dropped)."""
    return [n.strip() for value in values or [] for n in value.split(",") if n.strip()]


def device(spec: str) -> str:
    """``--device`` as typed, checked: auto, cpu, gpu, cuda or cuda:N of this machine (a GPU
    only where torch sees one). Click refuses anything else, naming the option."""
    try:
        if is_cuda(spec) and not torch.cuda.is_available():
            raise typer.BadParameter(f"{spec!r}: torch sees no GPU on this machine (no CUDA "
                                     "device or a CPU-only torch); use --device cpu or auto")
    except ConfigError as err:
        raise typer.BadParameter(f"{spec!r}: {str(err).split(': ', 1)[-1]}") from None
    return spec


Device = Annotated[str, typer.Option(
    "--device", parser=device, metavar="<auto|cpu|gpu|cuda|cuda:N>",
    help="where the models run and videos decode: auto is cuda where torch sees a GPU, else cpu")]
DATASET_SPLITS = ("train / test (fold 1), train2, test3, ...; folder dataset: the name of a "
                  "folder under --root (ROOT/<split>/<class>/<video>), or all for a root with "
                  "no split folders (ROOT/<class>/<video>); ssv2: train, validation, test; "
                  "kinetics: train, validate, test; diving48: train, test")
BACKBONES = (f"a built-in name ({', '.join(list_backbones())}; tiny-* are small random models "
             "for tests), a Hugging Face hub id (org/name) or a save_pretrained directory")
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]


def show_progress(quiet: bool) -> bool:
    """Whether a command draws progress bars: not with --quiet, and only on a terminal (a piped
    or redirected stderr, e.g. a log file, gets none)."""
    return not quiet and sys.stderr.isatty()


LIST_OPTIONS = ("--teachers",)


def join_list_options(args: list[str]) -> list[str]:
    """``--teachers a b c`` (the seed's spelling) -> ``--teachers a,b,c``: the words after a
    list option, up to the next option, are its values. Only commands without positional
    arguments take a list option, so no argument is swallowed."""
    out: list[str] = []
    joining = False
    for arg in args:
        if arg == "--":
            joining = False
        elif joining and not arg.startswith("-"):
            out[-1] = f"{out[-1]},{arg}" if out[-1] else arg
            continue
        joining = False
        out.append(arg)
        if arg in LIST_OPTIONS:
            out.append("")   # its value comes next
            joining = True
        elif arg.split("=", 1)[0] in LIST_OPTIONS and "=" in arg:
            joining = True
    # an option left without a value: let click say so
    return [a for i, a in enumerate(out) if a or out[i - 1] not in LIST_OPTIONS]


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

    def main(self, args=None, *rest, **kwargs):
        args = sys.argv[1:] if args is None else list(args)
        return super().main(join_list_options(args), *rest, **kwargs)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MissingExtraError as exc:
            raise fail(str(exc)) from exc
