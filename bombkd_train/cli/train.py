"""``bombkd train-converters``, ``bombkd train``, ``bombkd eval`` and ``bombkd demo``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from bombkd_io.datasets import DATASETS
from bombkd_train.cli._common import names, user_errors

Loader = Annotated[str, typer.Option(
    "--loader", help="wds: cached features; dali: decode the videos")]
Root = Annotated[str, typer.Option("--root", help="wds: the feature cache; dali: the dataset root")]
Split = Annotated[str, typer.Option("--split", help="split name, e.g. train, test, train2")]
Dataset = Annotated[Optional[str], typer.Option(
    "--dataset", help=f"one of {', '.join(DATASETS)}")]
Student = Annotated[Optional[str], typer.Option(
    "--student", help="student backbone (registry or hub name)")]
Frames = Annotated[Optional[int], typer.Option(
    "--frames", help="frames per clip (dali; default 16 or the cache's)")]
Size = Annotated[Optional[int], typer.Option(
    "--size", help="clip side (dali; default the backbone's)")]
Batch = Annotated[int, typer.Option("--batch", min=1)]
Workers = Annotated[int, typer.Option(
    "--workers", min=0, help="loader workers (they also shape the epoch plan)")]
ShardSize = Annotated[Optional[int], typer.Option(
    "--shard-size", "--shard_size", help="dali: epoch-plan shard size (default the cache's)")]
Cache = Annotated[Optional[str], typer.Option(
    "--cache", help="dali: a feature cache whose epoch plan and student settings to replay")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda")]
OnError = Annotated[str, typer.Option(
    "--on-error", "--on_error",
    help="wds: a corrupt shard stops the run (raise) or is skipped and reported (skip)")]
Quiet = Annotated[bool, typer.Option("--quiet", help="no progress bars")]
Teachers = Annotated[list[str], typer.Option(
    "--teachers", help="teacher names, comma-separated (A,B,C); may be repeated")]
SaveDir = Annotated[str, typer.Option("--save-dir", "--save_dir")]


def train_converters_cmd(
    root: Annotated[str, typer.Option("--root", help="cache with student and teacher features")],
    split: Split,
    teachers: Teachers,
    save_dir: SaveDir,
    epochs: Annotated[int, typer.Option("--epochs", min=0)] = 5,
    kind: Annotated[str, typer.Option("--kind", help="linear or mlp")] = "linear",
    val_frac: Annotated[float, typer.Option("--val-frac", "--val_frac")] = 0.1,
    lr: Annotated[float, typer.Option("--lr")] = 1e-3,
    batch: Batch = 32,
    seed: Annotated[int, typer.Option("--seed")] = 0,
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
            loader_workers=workers, device=device, progress=not quiet))
    where = f"{result.held_out} held-out samples" if result.held_out else "the training samples"
    typer.echo(f"cosine similarity on {where}:")
    for name, cos in result.cosine.items():
        typer.echo(f"  {name}: {cos:.4f}")
    typer.echo(f"wrote {result.path}")


def train_cmd(
    loader: Loader, root: Root, split: Split, teachers: Teachers,
    converters: Annotated[str, typer.Option("--converters", help="checkpoint of train-converters")],
    classes: Annotated[int, typer.Option("--classes", help="number of classes of the head")],
    dataset: Dataset = None, student: Student = None, frames: Frames = None, size: Size = None,
    batch: Batch = 8,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 1,
    lr: Annotated[float, typer.Option("--lr")] = 1e-3,
    gate_l1: Annotated[float, typer.Option("--gate-l1", "--gate_l1", help="gate L1 weight")] = 1e-3,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    save_dir: SaveDir = "runs/fusion",
    resume: Annotated[bool, typer.Option("--resume", help="continue from the last checkpoint")
                      ] = False,
    val_split: Annotated[Optional[str], typer.Option("--val-split", "--val_split")] = None,
    workers: Workers = 0, shard_size: ShardSize = None, cache: Cache = None,
    on_error: OnError = "raise", device: Device = "auto", quiet: Quiet = False,
) -> None:
    """Train the fusion head on cached features (--loader wds) or on videos (--loader dali)."""
    from bombkd_train.config import DataConfig, TrainConfig
    from bombkd_train.trainer import train

    data = DataConfig(loader=loader, root=root, dataset=dataset, student=student, frames=frames,
                      size=size, batch_size=batch, loader_workers=workers, seed=seed,
                      shard_size=shard_size, cache=cache, device=device, on_error=on_error)
    with user_errors():
        result = train(TrainConfig(
            data=data, split=split, teachers=names(teachers), converters=converters,
            classes=classes, epochs=epochs, lr=lr, gate_l1=gate_l1, save_dir=save_dir,
            resume=resume, val_split=val_split, progress=not quiet))
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun rank 0 reports for all ranks (the other ranks write nothing)
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
    loader: Loader, root: Root, split: Split,
    fusion: Annotated[str, typer.Option("--fusion", help="checkpoint written by `bombkd train`")],
    converters: Annotated[Optional[str], typer.Option(
        "--converters", help="default: the run's")] = None,
    out: Annotated[Optional[str], typer.Option("--out", help="default: next to --fusion")] = None,
    dataset: Dataset = None, student: Student = None, frames: Frames = None, size: Size = None,
    batch: Batch = 32, workers: Workers = 0, cache: Cache = None, on_error: OnError = "raise",
    device: Device = "auto",
) -> None:
    """Top-1, top-5, per-class accuracy and a confusion matrix (eval.json, confusion.png)."""
    from bombkd_io.errors import extra_hint
    from bombkd_train.config import DataConfig, EvalConfig
    from bombkd_train.evaluate import evaluate

    data = DataConfig(loader=loader, root=root, dataset=dataset, student=student, frames=frames,
                      size=size, batch_size=batch, loader_workers=workers, cache=cache,
                      device=device, on_error=on_error)
    with user_errors():
        result, path = evaluate(EvalConfig(data=data, split=split, fusion=fusion,
                                           converters=converters, out=out))
    typer.echo(f"{result.count} clips: top-1 {result.top1:.1f}%, top-5 {result.top5:.1f}%")
    png = path.parent / "confusion.png"
    typer.echo(f"wrote {path} and {png}" if png.is_file() else f"wrote {path}; {extra_hint('plot')}")


def demo_cmd(
    out: Annotated[Path, typer.Argument(help="working folder")] = Path("bombkd-demo"),
    batch: Annotated[Optional[int], typer.Option("--batch", min=1)] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs")] = None,
    device: Device = "auto",
    quiet: Quiet = False,
) -> None:
    """The whole path on the built-in sample data with tiny backbones, in both modes."""
    from bombkd_train.config import DemoConfig
    from bombkd_train.demo import run_demo

    cfg = DemoConfig(out=str(out), device=device, progress=not quiet)
    cfg.batch_size, cfg.epochs = batch or cfg.batch_size, epochs or cfg.epochs
    with user_errors():
        report = run_demo(cfg)
    typer.echo(report.markdown)
    if report.parity_max_rel > report.parity_tolerance:
        raise typer.Exit(code=1)  # the two loaders disagree: a bug, not a bad input


def register(app: typer.Typer) -> None:
    """Add this group's commands to ``app``."""
    app.command("train-converters")(train_converters_cmd)
    app.command("train")(train_cmd)
    app.command("eval")(eval_cmd)
    app.command("demo")(demo_cmd)
