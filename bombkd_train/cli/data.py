"""``bombkd sample-data`` and ``bombkd probe``: the sample dataset and a look at video files."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import numpy as np
import typer

from bombkd_io.atomic import atomic_path
from bombkd_io.errors import VideoError, needs_extra
from bombkd_io.sample_data import CODECS
from bombkd_train.cli._common import Device, Quiet, fail, show_progress, user_errors

Codec = Literal[CODECS + ("mixed",)]  # click lists and checks the choices


def sample_data(
    out: Annotated[Path, typer.Argument(help="Directory to write the dataset to (UCF101 layout).")],
    classes: Annotated[int, typer.Option("--classes", min=1, help="Number of classes.")] = 6,
    per_class: Annotated[int, typer.Option("--per-class", "--per_class", min=1,
                                           help="Clips per class.")] = 10,
    codec: Annotated[Codec, typer.Option(
        "--codec", help="Video codec; mixed: a different one per clip.")] = "vp9",
    seed: Annotated[int, typer.Option("--seed", help="Same seed, byte-identical files.")] = 0,
    quiet: Quiet = False,
) -> None:
    """Write a small, learnable action dataset (coloured shapes in motion) in UCF101 layout."""
    from bombkd_io.sample_data import make_sample_data

    root = make_sample_data(out, classes=classes, per_class=per_class, codec=codec, seed=seed,
                            progress=show_progress(quiet))
    typer.echo(f"wrote {classes * per_class} clips ({codec}) to {root}; "
               f"index with --dataset ucf101 --root {root}")


def probe(
    videos: Annotated[list[Path], typer.Argument(help="Video files to probe.")],
    device: Device = "auto",
    save_frames: Annotated[Optional[Path], typer.Option(
        "--save-frames", "--save_frames",
        help="Write a contact sheet (PNG) of the sampled frames (one video only).")] = None,
    frames: Annotated[int, typer.Option("--frames", min=1, help="Frames per clip.")] = 16,
    size: Annotated[int, typer.Option("--size", min=8, help="Clip size in pixels.")] = 112,
) -> None:
    """Codec, size, fps, decodable frames and decode route (dali or pyav) of each video, and
    why it takes that route on this device."""
    from bombkd_io.video import parse_device, probe_video

    device = parse_device(device)  # checked by --device's parser: a device this machine has
    if save_frames is not None and len(videos) != 1:
        raise fail(f"--save-frames takes one video, got {len(videos)}; probe the others "
                   f"without it, e.g. `bombkd probe {videos[0]} --save-frames {save_frames}`")
    bad = 0
    for path in videos:
        try:
            info = probe_video(path, device)
        except VideoError as err:
            if len(videos) == 1:
                raise fail(str(err)) from err
            typer.echo(f"error: {err}", err=True)
            bad += 1
            continue
        typer.echo(f"{info.path}: {info.codec} {info.width}x{info.height} {info.fps:g} fps "
                   f"{info.num_frames} frames route={info.route} ({info.reason})")
        for warning in info.warnings:   # it decodes, but maybe not as it should
            typer.echo(f"  warning: {warning}")
    if save_frames is not None:
        from bombkd_io.video import decode_clip  # DALI: only the contact sheet decodes

        with user_errors():
            clip = decode_clip(videos[0], frames=frames, size=size, device=device)
        write_contact_sheet(clip, save_frames)
        typer.echo(f"wrote {save_frames}")
    if bad:
        raise typer.Exit(code=2)


def write_contact_sheet(clip: np.ndarray, out: Path, columns: int = 8) -> None:
    """Frames ``[T, S, S, 3]`` tiled ``columns`` wide into one PNG (temp name, then rename)."""
    with needs_extra("video"):
        from PIL import Image

    t, s = clip.shape[0], clip.shape[1]
    rows = -(-t // columns)
    sheet = np.zeros((rows * s, min(t, columns) * s, 3), np.uint8)
    for i, frame in enumerate(clip):
        r, c = divmod(i, columns)
        sheet[r * s:(r + 1) * s, c * s:(c + 1) * s] = frame
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        Image.fromarray(sheet).save(tmp, format="PNG")


def register(app: typer.Typer) -> None:
    """Add this group's commands to ``app``."""
    app.command("sample-data")(sample_data)
    app.command("probe")(probe)
