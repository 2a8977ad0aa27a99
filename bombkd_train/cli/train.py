"""``bombkd train-converters``, ``bombkd train``, ``bombkd eval`` and ``bombkd demo``.

``bombkd train`` stopped by SIGTERM, SIGINT or SIGUSR1 writes a step checkpoint, says where and
how to resume, and exits with ``EXIT_PREEMPTED``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from bombkd_io.datasets import DATASETS
from bombkd_io.errors import ON_ERROR
from bombkd_train.cli._common import (BACKBONES, DATASET_SPLITS, Device, Quiet, fail, names,
                                      show_progress, user_errors)
from bombkd_train.config import CONVERTER_KINDS, LOADERS

# `bombkd train` stopped by a signal after writing its checkpoint: sysexits.h's EX_TEMPFAIL,
# "a temporary failure; retry later" (a second signal ends it at once, as that signal does)
EXIT_PREEMPTED = 75

Loader = Annotated[Optional[Literal[LOADERS]], typer.Option(
    "--loader", help="wds: cached features (bombkd featurize); dali: decode the videos "
    "(video mode, the default)")]
UseCached = Annotated[bool, typer.Option(
    "--use-cached-features", "--use_cached_features", help="the same as --loader wds")]
Root = Annotated[str, typer.Option("--root", help="wds: the feature cache; dali: the dataset root")]
Split = Annotated[str, typer.Option("--split", help=f"wds: a split of the cache (bombkd inspect "
                                    f"ROOT lists them); dali: {DATASET_SPLITS}")]
Dataset = Annotated[Optional[str], typer.Option(
    "--dataset", help=f"one of {', '.join(DATASETS)} (dali: required; wds: the cache's, if it "
    "holds several)")]
Student = Annotated[Optional[str], typer.Option(
    "--student", help=f"student backbone (dali: required; default the cache's or the run's): "
    f"{BACKBONES}")]
Frames = Annotated[Optional[int], typer.Option(
    "--frames", help="frames per clip (dali; default 16 or the cache's)")]
Size = Annotated[Optional[int], typer.Option(
    "--size", help="clip side (dali; default the backbone's)")]
Batch = Annotated[int, typer.Option("--batch", min=1, help="samples per batch")]
Epochs = Annotated[int, typer.Option("--epochs", min=1, help="passes over the split")]
Lr = Annotated[float, typer.Option("--lr", help="learning rate (AdamW)")]
Seed = Annotated[int, typer.Option(
    "--seed", help="fixes the initial weights and the sample order: same seed, same run")]
Workers = Annotated[int, typer.Option(
    "--workers", min=0, help="loader processes: they read ahead, the batches stay the same")]
ShardSize = Annotated[Optional[int], typer.Option(
    "--shard-size", "--shard_size", help="dali: epoch-plan shard size (default the cache's)")]
Cache = Annotated[Optional[str], typer.Option(
    "--cache", help="dali: a feature cache whose epoch plan and student settings to replay")]
Revision = Annotated[Optional[str], typer.Option(
    "--revision", help="dali: the student's hub branch, tag or commit (default: the --cache's, "
    "else the default branch)")]
OnError = Annotated[Literal[ON_ERROR], typer.Option(
    "--on-error", "--on_error",
    help="wds: a corrupt shard stops the run (raise) or is skipped and reported (skip)")]
Teachers = Annotated[list[str], typer.Option(
    "--teachers", help="teachers, space- or comma-separated (A B C or A,B,C): names of models "
    "in the feature cache, as featurize stored them (bombkd inspect ROOT lists them)")]
ShardCacheDir = Annotated[Optional[str], typer.Option(
    "--shard-cache", "--shard_cache", help="wds with a remote --root (s3://, gs://, ...): keep its "
    "shards in this local folder for epochs 2+ (verified once; ranks of a node may share it)")]
ShardCacheLimit = Annotated[Optional[str], typer.Option(
    "--shard-cache-limit", "--shard_cache_limit", help="most bytes --shard-cache keeps (50G, "
    "800M; least recently used shards go first); default: no limit")]
SaveDir = Annotated[str, typer.Option(
    "--save-dir", "--save_dir", help="folder for the checkpoints (created if missing)")]


def loader_of(loader: str | None, use_cached_features: bool) -> str:
    """``--loader``, with the seed's spellings: ``--use_cached_features`` is ``--loader wds``;
    neither is video mode (``dali``), the seed's default."""
    if use_cached_features and loader not in (None, "wds"):
        raise fail(f"--use_cached_features and --loader {loader} contradict each other; "
                   "pass one of them")
    return "wds" if use_cached_features else loader or "dali"


def train_converters_cmd(
    root: Annotated[str, typer.Option("--root", help="cache with student and teacher features")],
    split: Split,
    teachers: Teachers,
    save_dir: SaveDir,
    epochs: Annotated[int, typer.Option(
        "--epochs", min=0, help="passes of gradient descent after the least-squares fit "
        "(0: the fit alone)")] = 5,
    kind: Annotated[Literal[CONVERTER_KINDS], typer.Option(
        "--kind", help="converter: a linear map or a small MLP")] = "linear",
    val_frac: Annotated[float, typer.Option(
        "--val-frac", "--val_frac", help="share of samples held out to report cosine "
        "similarity on")] = 0.1,
    lr: Lr = 1e-3,
    batch: Batch = 32,
    seed: Seed = 0,
    dataset: Dataset = None,
    workers: Workers = 0,
    device: Device = "auto",
    quiet: Quiet = False,
) -> None:
    """Fit one converter per teacher (student -> teacher features) from a feature cache."""
    from bombkd_train.config import ConverterTrainConfig
    from bombkd_train.converters import train_converters

    with user_errors():
        result = train_converters(ConverterTrainConfig(
            root=root, split=split, teachers=names(teachers), save_dir=save_dir, epochs=epochs,
            kind=kind, val_frac=val_frac, lr=lr, batch_size=batch, seed=seed, dataset=dataset,
            loader_workers=workers, device=device, progress=show_progress(quiet)))
    where = f"{result.held_out} held-out samples" if result.held_out else "the training samples"
    typer.echo(f"cosine similarity on {where}:")
    for name, cos in result.cosine.items():
        typer.echo(f"  {name}: {cos:.4f}")
    typer.echo(f"wrote {result.path}")


def train_cmd(
    root: Root, split: Split, teachers: Teachers,
    converters: Annotated[str, typer.Option(
        "--converters", help="converters checkpoint written by train-converters, or the folder "
        "holding it")],
    loader: Loader = None, use_cached_features: UseCached = False,
    classes: Annotated[Optional[int], typer.Option(
        "--classes", help="classes of the head (default: the split's, from the cache or the "
        "dataset)")] = None,
    dataset: Dataset = None, student: Student = None, frames: Frames = None, size: Size = None,
    batch: Batch = 8,
    epochs: Epochs = 1,
    lr: Lr = 1e-3,
    weight_decay: Annotated[float, typer.Option(
        "--weight-decay", "--weight_decay", min=0, help="AdamW weight decay")] = 0.01,
    gate_l1: Annotated[float, typer.Option(
        "--gate-l1", "--gate_l1", help="L1 weight on the teacher gates (sparser fusion)")] = 1e-3,
    fusion_rank: Annotated[int, typer.Option(
        "--fusion-rank", "--fusion_rank", min=1, help="rank of the fusion head's low-rank "
        "teacher interactions")] = 64,
    seed: Seed = 0,
    save_dir: SaveDir = "runs/fusion",
    resume: Annotated[bool, typer.Option(
        "--resume", help="continue from the newest valid checkpoint in --save-dir")] = False,
    save_every: Annotated[Optional[int], typer.Option(
        "--save-every", "--save_every", min=1, help="also write a step checkpoint every N "
        "steps")] = None,
    save_every_minutes: Annotated[Optional[float], typer.Option(
        "--save-every-minutes", "--save_every_minutes", help="also write a step checkpoint "
        "every M minutes")] = None,
    keep: Annotated[int, typer.Option(
        "--keep", min=1, help="step checkpoints kept (the epoch checkpoints are all kept)")] = 2,
    val_split: Annotated[Optional[str], typer.Option(
        "--val-split", "--val_split", help="split to evaluate on after every epoch (as --split)")
    ] = None,
    workers: Workers = 0, shard_size: ShardSize = None, cache: Cache = None,
    revision: Revision = None, on_error: OnError = "raise", device: Device = "auto",
    shard_cache: ShardCacheDir = None, shard_cache_limit: ShardCacheLimit = None,
    quiet: Quiet = False,
) -> None:
    """Train the fusion head on cached features (--loader wds) or on videos (--loader dali).

    SIGTERM, SIGINT, SIGUSR1: finish the step, write a step checkpoint, exit 75; then --resume.
    """
    from bombkd_train.config import DataConfig, TrainConfig
    from bombkd_train.trainer import train

    data = DataConfig(loader=loader_of(loader, use_cached_features), root=root, dataset=dataset,
                      student=student, frames=frames, size=size, batch_size=batch,
                      loader_workers=workers, seed=seed, shard_size=shard_size, cache=cache,
                      revision=revision, device=device, on_error=on_error,
                      shard_cache=shard_cache, shard_cache_limit=shard_cache_limit)
    with user_errors():
        result = train(TrainConfig(
            data=data, split=split, teachers=names(teachers), converters=converters,
            classes=classes, epochs=epochs, lr=lr, weight_decay=weight_decay, gate_l1=gate_l1,
            fusion_rank=fusion_rank, save_dir=save_dir, resume=resume, val_split=val_split,
            save_every=save_every, save_every_minutes=save_every_minutes, keep=keep,
            progress=show_progress(quiet)))
    if int(os.environ.get("RANK", "0")) != 0:  # rank 0 reports for all ranks
        if result.stopped:
            raise typer.Exit(code=EXIT_PREEMPTED)
        return
    if result.stopped:
        again = "the same command" if resume else "the same command with --resume"
        typer.echo(f"stopped by {result.stopped} after step {result.steps}: wrote "
                   f"{result.checkpoint}; resume with {again}")
        raise typer.Exit(code=EXIT_PREEMPTED)
    last = result.last
    if last:
        skipped = f", {last['skipped']} samples skipped" if last["skipped"] else ""
        typer.echo(f"epoch {last['epoch']}: loss {last['loss']:.4f}, top-1 {last['top1']:.1f}%, "
                   f"{last['samples_per_s']:.1f} samples/s{skipped}")
    if result.checkpoint:
        typer.echo(f"wrote {result.checkpoint}")
    else:
        typer.echo(f"nothing to do: {save_dir} already holds {result.epochs} epochs "
                   "(raise --epochs)")


def eval_cmd(
    root: Root, split: Split,
    fusion: Annotated[str, typer.Option("--fusion", help="checkpoint written by `bombkd train`")],
    loader: Loader = None, use_cached_features: UseCached = False,
    converters: Annotated[Optional[str], typer.Option(
        "--converters", help="converters checkpoint or its folder (default: the run's)")] = None,
    out: Annotated[Optional[str], typer.Option(
        "--out", help="folder for eval.json and confusion.png (default: next to --fusion)")]
    = None,
    dataset: Dataset = None, student: Student = None, frames: Frames = None, size: Size = None,
    batch: Batch = 32, workers: Workers = 0, cache: Cache = None, revision: Revision = None,
    on_error: OnError = "raise", device: Device = "auto",
    shard_cache: ShardCacheDir = None, shard_cache_limit: ShardCacheLimit = None,
    quiet: Quiet = False,
) -> None:
    """Top-1, top-5, per-class accuracy and a confusion matrix (eval.json, confusion.png)."""
    from bombkd_io.errors import extra_hint
    from bombkd_train.config import DataConfig, EvalConfig
    from bombkd_train.evaluate import evaluate

    data = DataConfig(loader=loader_of(loader, use_cached_features), root=root, dataset=dataset,
                      student=student, frames=frames, size=size, batch_size=batch,
                      loader_workers=workers, cache=cache, revision=revision, device=device,
                      on_error=on_error, shard_cache=shard_cache,
                      shard_cache_limit=shard_cache_limit)
    with user_errors():
        result, path = evaluate(EvalConfig(data=data, split=split, fusion=fusion,
                                           converters=converters, out=out,
                                           progress=show_progress(quiet)))
    typer.echo(f"{result.count} clips: top-1 {result.top1:.1f}%, top-5 {result.top5:.1f}%")
    png = path.parent / "confusion.png"
    typer.echo(f"wrote {path} and {png}" if png.is_file()
               else f"wrote {path}; {extra_hint('plot')}")


def demo_cmd(
    out: Annotated[Path, typer.Argument(help="working folder")] = Path("bombkd-demo"),
    batch: Annotated[Optional[int], typer.Option(
        "--batch", min=1, help="samples per batch (default: the demo's)")] = None,
    epochs: Annotated[Optional[int], typer.Option(
        "--epochs", min=1, help="fusion epochs per mode (default: the demo's)")] = None,
    device: Device = "auto",
    quiet: Quiet = False,
) -> None:
    """The whole path on the built-in sample data with tiny backbones, in both modes."""
    from bombkd_train.config import DemoConfig
    from bombkd_train.demo import run_demo

    cfg = DemoConfig(out=str(out), device=device, progress=show_progress(quiet))
    cfg.batch_size, cfg.epochs = batch or cfg.batch_size, epochs or cfg.epochs
    with user_errors():
        report = run_demo(cfg)
    typer.echo(report.markdown)
    typer.echo(f"report: {report.path}")
    if report.parity_max_rel > report.parity_tolerance:
        raise typer.Exit(code=1)  # the two loaders disagree: a bug, not a bad input


def register(app: typer.Typer) -> None:
    """Add this group's commands to ``app``."""
    app.command("train-converters")(train_converters_cmd)
    app.command("train")(train_cmd)
    app.command("eval")(eval_cmd)
    app.command("demo")(demo_cmd)
