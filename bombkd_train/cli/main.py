"""The ``bombkd`` command: a typer app, one module per command group, each thin over a library call.
``python -m bombkd`` runs the same app (``bombkd/__main__.py``)."""
from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path
from typing import Annotated

import typer

from bombkd_train.cli import cache, data, featurize, train
from bombkd_train.cli._common import Commands

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def version() -> str:
    """The installed package's version; from a source tree that is not installed, pyproject's."""
    try:
        return metadata.version("bombkd")
    except metadata.PackageNotFoundError:
        found = re.search(r'^version = "([^"]+)"', PYPROJECT.read_text(), re.M) \
            if PYPROJECT.is_file() else None
        return found[1] if found else "unknown"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"bombkd {version()}")
        raise typer.Exit()


app = typer.Typer(
    name="bombkd",
    help="Fast, reproducible training of a multi-teacher video distillation fusion head.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=Commands,
)


@app.callback()
def _options(
    show_version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_print_version,
        help="print bombkd's version and exit")] = False,
) -> None:
    """Fast, reproducible training of a multi-teacher video distillation fusion head."""


for group in (data, featurize, cache, train):
    group.register(app)


def main() -> None:
    """``bombkd`` and ``python -m bombkd``."""
    app(prog_name="bombkd")


if __name__ == "__main__":
    main()
