"""The ``bombkd`` command: a typer app, one module per command group, each thin over a library call."""
from __future__ import annotations

import typer

from bombkd_train.cli import cache, data, featurize, train
from bombkd_train.cli._common import Commands

app = typer.Typer(
    name="bombkd",
    help="Fast, reproducible training of a multi-teacher video distillation fusion head.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=Commands,
)
for group in (data, featurize, cache, train):
    group.register(app)

if __name__ == "__main__":
    app()
