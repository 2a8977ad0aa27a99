"""Evaluation of a fusion head: top-1, top-5, per-class accuracy and the confusion matrix.

``evaluate_model`` is what the trainer calls each epoch on ``--val-split``; ``evaluate`` is
``bombkd eval``: it rebuilds the model from a fusion checkpoint, runs the split through either
loader and writes ``eval.json`` and, with matplotlib (``bombkd[plot]``), ``confusion.png``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from bombkd_io.atomic import atomic_path
from bombkd_io.errors import ConfigError, MissingExtraError, needs_extra
from bombkd_io.video.route import parse_device
from bombkd_train.checkpoint import FUSION_KIND, load_checkpoint
from bombkd_train.config import EvalConfig
from bombkd_train.converters import load_converters
from bombkd_train.data import open_source
from bombkd_train.fusion import FusionHead, FusionModel
from bombkd_train.runtime import all_reduce_sum, model_threads


@dataclass
class EvalResult:
    count: int
    top1: float                        # percent
    top5: float                        # percent (top-k with k = min(5, classes))
    per_class: dict[str, float | None]  # class name -> percent (None: no sample of that class)
    confusion: list[list[int]]         # [true][predicted]
    classes: list[str]


def topk_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts (scalar tensors, on the logits' device) of samples whose label is the top
    prediction, and of those whose label is among the top ``min(5, C)``."""
    best = logits.topk(min(5, logits.shape[1]), dim=1).indices  # [B, k]
    hits = best == labels[:, None]  # [B, k]
    return hits[:, 0].sum(), hits.any(dim=1).sum()


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, loader, classes: list[str], num_classes: int, *,
                   device: str = "cpu", epoch: int = 0, progress: bool = True) -> EvalResult:
    """Run every batch of ``loader`` (all ranks together when distributed) through ``model``.

    ``num_classes`` is the head's output size; it may exceed the classes the split names.
    """
    classes = list(classes) + [f"class{c}" for c in range(len(classes), num_classes)]
    n = num_classes
    confusion = torch.zeros(n, n, dtype=torch.int64)
    top5 = torch.zeros((), dtype=torch.int64)
    was_training = model.training
    model.eval()
    loader.set_epoch(epoch)
    for batch in tqdm(loader, desc="eval", unit="batch", disable=not progress, leave=False):
        logits = model(batch["student"].to(device).float()).logits.float().cpu()  # [B, C]
        labels = batch["label"]
        pred = logits.argmax(dim=1)  # [B]
        confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
        top5 += topk_hits(logits, labels)[1]
    model.train(was_training)
    confusion, top5 = (all_reduce_sum(t, device) for t in (confusion, top5))  # all ranks
    return _result(confusion, int(top5), classes)


def _result(confusion: torch.Tensor, top5: int, classes: list[str]) -> EvalResult:
    count = int(confusion.sum())
    per_row = confusion.sum(dim=1)  # [C]
    per_class = {name: (100.0 * int(confusion[c, c]) / int(per_row[c]) if per_row[c] else None)
                 for c, name in enumerate(classes)}
    pct = (lambda k: 100.0 * k / count) if count else (lambda k: 0.0)
    return EvalResult(count=count, top1=pct(int(confusion.diagonal().sum())), top5=pct(top5),
                      per_class=per_class, confusion=confusion.tolist(), classes=list(classes))


def save_eval(result: EvalResult, out_dir: str | Path, *, extra: dict | None = None) -> Path:
    """Write ``eval.json`` and ``confusion.png`` atomically into ``out_dir``; returns the json.

    Without matplotlib there is no confusion.png (an older one is removed: it would not match
    eval.json, which holds the matrix either way)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        save_confusion_png(result, out / "confusion.png")
    except MissingExtraError:
        (out / "confusion.png").unlink(missing_ok=True)
    with atomic_path(out / "eval.json") as tmp:
        tmp.write_text(json.dumps({**asdict(result), **(extra or {})}, indent=2))
    return out / "eval.json"


def save_confusion_png(result: EvalResult, path: Path) -> None:
    """The confusion matrix as a PNG (MissingExtraError without ``bombkd[plot]``)."""
    with needs_extra("plot"):
        import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(result.classes)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * n + 2), max(4, 0.5 * n + 1.5)))
    ax.imshow(result.confusion, cmap="Blues")
    ax.set(xlabel="predicted", ylabel="true", xticks=range(n), yticks=range(n),
           title=f"top-1 {result.top1:.1f}% ({result.count} clips)")
    ax.set_xticklabels(result.classes, rotation=90, fontsize=7)
    ax.set_yticklabels(result.classes, fontsize=7)
    for (i, j), v in _cells(result.confusion):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=6)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)


def _cells(matrix: list[list[int]]):
    return (((i, j), v) for i, row in enumerate(matrix) for j, v in enumerate(row) if v)


def load_fusion(ckpt: dict, *, converters: str | None = None, student_dim: int,
                student_tokens: int) -> FusionModel:
    """A fusion model from a ``bombkd train`` checkpoint dict (head + the frozen converters)."""
    head = FusionHead.from_spec(ckpt["head"])
    head.load_state_dict(ckpt["model"])
    path = converters or ckpt["config"]["converters"]
    convs, stats = load_converters(path, student_dim=student_dim, student_tokens=student_tokens,
                                   teachers=head.teacher_names)
    return FusionModel(convs, head, stats).eval()


def evaluate(cfg: EvalConfig) -> tuple[EvalResult, Path]:
    """``bombkd eval``: returns the result and the path of ``eval.json``."""
    cfg.validate()
    device = parse_device(cfg.data.device)
    ckpt = load_checkpoint(cfg.fusion, kind=FUSION_KIND, argument="--fusion")
    # the student (and its clips) the head was trained on, unless the user overrides them
    stu = ckpt["student"]
    trained = {"student": stu["backbone"], "frames": stu["frames"], "size": stu["size"],
               "pooling": stu["pool"]}
    data = replace(cfg.data, device=device,
                   **{k: getattr(cfg.data, k) or v for k, v in trained.items()})
    source = open_source(data, cfg.split)
    try:
        if len(source.classes) > ckpt["head"]["num_classes"]:
            raise ConfigError(f"--split {cfg.split}: {len(source.classes)} classes, but the head "
                              f"in {cfg.fusion} has {ckpt['head']['num_classes']}")
        model = load_fusion(ckpt, converters=cfg.converters, student_dim=source.student.dim,
                            student_tokens=source.student.tokens)
        with model_threads(device, data.loader_workers):  # see bombkd_train.runtime
            result = evaluate_model(model.to(device), source.loader, source.classes,
                                    ckpt["head"]["num_classes"], device=device,
                                    progress=cfg.progress)
    finally:
        source.close()  # the video loader's decoder threads and pipeline
    out = Path(cfg.out) if cfg.out else Path(cfg.fusion).parent / f"eval-{cfg.split}"
    return result, save_eval(result, out, extra={"fusion": str(cfg.fusion), "split": cfg.split,
                                                 "loader": cfg.data.loader})
