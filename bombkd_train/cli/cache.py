"""``bombkd inspect`` and ``bombkd import-cache``: look into and convert feature caches."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from bombkd_io.shards.codec import DTYPES
from bombkd_train.cli._common import Quiet, fail, show_progress, user_errors

IMPORT_HELP = """Convert a TC-BombKD feature cache (polyspace.data.featurize) into a bombkd cache.

SRC is a features_{dataset}_{split}.index.json (or a directory holding one) whose shards are
npy_dirs (storage "npy_dir") or .pkl files (storage "pkl"), a single
features_{dataset}_{split}.pkl, a directory of features_*_shard_*.pkl, or one npy_dir
({name}_concat.npy + {name}_offs.npy per model, labels.npy, paths.npy; or student.npy,
<teacher>.npy, labels.npy; or per-sample .npz files). Pickle records are {"student": [T, D],
"<teacher>": [T, D] | "teachers": {...}, "label": int, "path": str}. Every sample of a model
must have the same [T, D]. See bombkd_io/shards/FORMAT.md. Pickle files run arbitrary code
when loaded: they are read only with --trust-pickle."""


def inspect(
    root: Annotated[str, typer.Argument(help="cache directory (holds *.index.json), or its URL "
                                        "(s3://, gs://, az://, https://, hf://)")],
    split: Annotated[Optional[str], typer.Option(
        "--split", help="split; default: every split")] = None,
    dataset: Annotated[Optional[str], typer.Option(
        "--dataset", help="dataset name, if several")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="re-hash every shard and decode every "
                                         "sample; exit 2 naming any bad shard")] = False,
    quiet: Quiet = False,
) -> None:
    """Summarise a feature cache: models, shapes, dtype, counts, bytes, failed videos."""
    from bombkd_io.shards.manifest import load_manifest, summarize
    from bombkd_io.shards.verify import verify_cache

    with user_errors():
        splits = [split] if split else _splits(root)
        manifests = [load_manifest(root, s, dataset) for s in splits]
    bad = []
    for m in manifests:
        typer.echo(summarize(m, root))
        if verify:
            problems = verify_cache(root, m, progress=show_progress(quiet))
            bad += problems
            typer.echo(f"  verify: {'ok' if not problems else f'{len(problems)} problem(s)'}")
    if bad:
        raise fail("bad shards:\n" + "\n".join(f"  {p}" for p in bad))


def _splits(root: str) -> list[str]:
    """Every split with a manifest in ``root`` (``{dataset}-{split}.index.json``), or with a
    featurize run still to finish (``{dataset}-{split}[.rank{R}].progress.json``: its load says
    so)."""
    from bombkd_io.shards.manifest import MANIFEST_SUFFIX, PROGRESS_SUFFIX, load_manifest
    from bombkd_io.storage import list_names

    # names have no dots: what follows one in the stem is a rank's (".rank1")
    found = sorted({name[:-len(suffix)].split(".")[0].rsplit("-", 1)[-1]
                    for suffix in (MANIFEST_SUFFIX, PROGRESS_SUFFIX)
                    for name in list_names(root) if name.endswith(suffix) and "-" in name})
    if not found:
        load_manifest(root, "<split>")  # raises the error listing what the directory holds
    return found


def import_cache(
    src: Annotated[Path, typer.Argument(help="TC-BombKD index .json, .pkl, or directory")],
    out: Annotated[str, typer.Option("--out", help="bombkd cache directory to write, or a URL "
                                     "(s3://, gs://, az://: written locally, then uploaded)")],
    split: Annotated[Optional[str], typer.Option("--split", help="split name (default: from "
                                                 "the index or file name)")] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", help="dataset name (default: "
                                                   "from the index or file name)")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", "--trust_pickle", help="allow "
                                               "reading .pkl files; pickle can run arbitrary "
                                               "code, use only on caches you trust")] = False,
    shard_size: Annotated[int, typer.Option("--shard-size", "--shard_size",
                                            help="samples per output shard")] = 1000,
    dtype: Annotated[Optional[Literal[tuple(DTYPES)]], typer.Option(
        "--dtype", help="stored features (default: the source's)")] = None,
    quiet: Quiet = False,
) -> None:
    from bombkd_io.shards.import_tc import import_tc_cache
    from bombkd_io.shards.manifest import summarize

    with user_errors():
        manifest = import_tc_cache(src, out, split=split, dataset=dataset,
                                   trust_pickle=trust_pickle, shard_size=shard_size, dtype=dtype,
                                   progress=show_progress(quiet))
    typer.echo(summarize(manifest, out))


import_cache.__doc__ = IMPORT_HELP


def register(app: typer.Typer) -> None:
    """Add this group's commands to ``app``."""
    app.command("inspect")(inspect)
    app.command("import-cache", help=IMPORT_HELP)(import_cache)
