"""``bombkd featurize``: videos -> student + teacher features -> WebDataset shards.

``--teachers`` takes names space- or comma-separated (``--teachers videomae timesformer vivit``
or ``videomae,timesformer,vivit``) and may be given more than once.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from bombkd_io.datasets import DATASETS
from bombkd_io.sampling import DEFAULT_SHARD_SIZE
from bombkd_io.shards.codec import DTYPES
from bombkd_io.shards.manifest import manifest_path
from bombkd_train.backbones import POOLS
from bombkd_train.cli._common import (BACKBONES, DATASET_SPLITS, Device, Quiet, fail, names,
                                      show_progress, user_errors)
from bombkd_train.config import FORMATS

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C


def featurize_command(
    dataset: Annotated[str, typer.Option(help=f"one of {', '.join(DATASETS)}")],
    root: Annotated[Path, typer.Option(help="dataset root (videos and split files)")],
    split: Annotated[str, typer.Option(help=DATASET_SPLITS)],
    student: Annotated[str, typer.Option(help=f"student backbone: {BACKBONES}")],
    out: Annotated[str, typer.Option(help="cache directory (created if missing), or a URL "
                                     "(s3://, gs://, az://): shards are uploaded as they finish, "
                                     "the manifest last")],
    teachers: Annotated[Optional[list[str]], typer.Option(
        help="teacher backbones, space- or comma-separated (A B C or A,B,C), each like "
             "--student (NAME@REV pins a hub revision); adding one to an existing cache "
             "computes only its features")] = None,
    format: Annotated[Literal[FORMATS], typer.Option(
        "--format", help="cache format: WebDataset tar shards")] = "wds",
    shard_size: Annotated[int, typer.Option("--shard-size", "--shard_size",
                                            help="samples per shard")] = DEFAULT_SHARD_SIZE,
    fp16: Annotated[bool, typer.Option("--fp16", help="store float16 (the default)")] = False,
    dtype: Annotated[Optional[Literal[tuple(DTYPES)]], typer.Option(
        help="stored features: float16 (default) or float32 (exact parity with video mode)")]
    = None,
    frames: Annotated[int, typer.Option(help="student clip length")] = 16,
    size: Annotated[Optional[int], typer.Option(help="student clip side (default: the model's)")]
    = None,
    batch: Annotated[int, typer.Option("--batch", help="clips per model call")] = 8,
    workers: Annotated[int, typer.Option(help="decode threads")] = 4,
    resume: Annotated[bool, typer.Option(
        "--resume", help="finish an interrupted run; keep shards that verify, redo the rest")]
    = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", "--dry_run", help="print the bytes it would write and the free space")]
    = False,
    pool: Annotated[Literal[POOLS], typer.Option(
        help="features kept per clip: time ([T',D]), mean ([1,D]) or none (all tokens)")]
    = "time",
    strict: Annotated[bool, typer.Option(
        "--strict", help="leave out (as failed) videos read or decoded with warnings: damaged "
        "or truncated files that still decode")] = False,
    device: Device = "auto",
    quiet: Quiet = False,
    revision: Annotated[Optional[str], typer.Option(
        help="the student's hub branch, tag or commit (default: the default branch)")] = None,
    rank: Annotated[Optional[int], typer.Option(
        help="job arrays: this task's rank; it writes shards k with k % --world-size == rank "
             "(under torchrun the rank comes from torchrun)")] = None,
    world_size: Annotated[Optional[int], typer.Option(
        "--world-size", "--world_size", help="job arrays: how many tasks write the cache")]
    = None,
    finalize: Annotated[bool, typer.Option(
        "--finalize", help="job arrays: write the manifest once every task is done (checks "
        "every shard; any machine)")] = False,
) -> None:
    """Decode every clip once, run the student and every teacher on it, write one shard set
    per model and the manifest. Re-run with a new teacher to add only its shard set.

    Over several processes: under torchrun each rank writes shards k with k % WORLD_SIZE ==
    RANK and rank 0 writes the manifest; a job array's tasks take --rank/--world-size and
    --finalize writes the manifest. The cache is the same bytes whatever the number."""
    from bombkd_train.config import FeaturizeConfig
    from bombkd_train.featurize import (FeaturizeStats, estimate_featurize, featurize,
                                        finalize_featurize)
    from bombkd_train.runtime import launch_rank, launch_world

    if fp16 and dtype not in (None, "float16"):
        raise fail(f"--fp16 and --dtype {dtype} contradict each other; pass one of them")
    if (rank is None) != (world_size is None):
        raise fail("--rank and --world-size go together (a job array's task: --rank "
                   "$SLURM_ARRAY_TASK_ID --world-size $SLURM_ARRAY_TASK_COUNT)")
    if finalize and (rank is not None or dry_run or resume):
        raise fail("--finalize writes the manifest of a finished job array: pass it without "
                   "--rank/--world-size, --resume or --dry-run")
    if launch_world() > 1 and (rank is not None or finalize):
        raise fail("under torchrun the rank and world size come from torchrun and rank 0 "
                   "writes the manifest: drop --rank/--world-size/--finalize")
    config = FeaturizeConfig(dataset=dataset, root=str(root), split=split, student=student,
                             out=str(out), teachers=names(teachers), format=format,
                             shard_size=shard_size, dtype=dtype or "float16", frames=frames,
                             size=size, batch_size=batch, decode_threads=workers, pooling=pool,
                             device=device, resume=resume, strict=strict, revision=revision,
                             progress=show_progress(quiet), rank=rank or 0,
                             world_size=world_size or 1)
    with user_errors():
        if finalize:
            manifest = finalize_featurize(config)
            typer.echo(f"finalized: {manifest.count} clips in {len(manifest.models)} shard "
                       f"set(s), {len(manifest.failed)} failed")
            typer.echo(f"manifest: {manifest_path(out, manifest.dataset, manifest.split)}")
            return
        if dry_run:
            estimate = estimate_featurize(config)
            typer.echo(estimate.summary())
            if not estimate.fits:
                raise fail(f"--out {out}: not enough free space for this cache")
            return
        stats = FeaturizeStats()
        try:
            manifest = featurize(config, stats=stats)
        except KeyboardInterrupt:  # finished shards are kept; the one being written is dropped
            print("interrupted: re-run with --resume to finish", file=sys.stderr)
            raise typer.Exit(code=EXIT_INTERRUPTED) from None
    if launch_rank() != 0:  # rank 0 speaks for the run
        return
    for line in stats.ranks:
        typer.echo(line)
    if manifest is None:  # a job array's task
        typer.echo(f"rank {rank} of {world_size} done; once every rank is, write the manifest "
                   "with the same command and --finalize instead of --rank/--world-size")
        return
    typer.echo(stats.summary(str(out)) if stats.clips else
               f"nothing to do: {out} already holds {sorted(manifest.models)} "
               f"for {manifest.count} clips")
    typer.echo(f"manifest: {manifest_path(out, manifest.dataset, manifest.split)}")


def register(app: typer.Typer) -> None:
    """Add ``featurize`` to ``app``."""
    app.command("featurize")(featurize_command)
