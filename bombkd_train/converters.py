"""Converters, frozen maps from the student's feature space into each teacher's: the model, the
record its checkpoint holds, and its training (``bombkd train-converters``).

A converter resamples the student tokens to the teacher's token count (linear interpolation along
time), then projects the width: a linear map (``kind="linear"``) started at the closed-form
least-squares solution, plus a residual MLP (``kind="mlp"``) whose last layer starts at zero, so
training starts from the least-squares fit and only improves on it.

The record (``converters_checkpoint``, read back by ``load_converters``) is saved and loaded as a
``CONVERTERS_KIND`` checkpoint by ``bombkd_train.checkpoint``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from bombkd_io.atomic import remove_temps
from bombkd_io.errors import ConfigError
from bombkd_io.lock import lock_folder
from bombkd_io.video.route import parse_device
from bombkd_train.checkpoint import (CONVERTERS_KIND, checkpoint_header, load_checkpoint,
                                     save_checkpoint)
from bombkd_train.config import CONVERTER_KINDS, ConverterTrainConfig
from bombkd_train.runtime import model_threads



def resample_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """Resample ``[B, T, D]`` to ``[B, length, D]`` by linear interpolation along time."""
    if x.shape[1] == length:
        return x
    y = F.interpolate(x.transpose(1, 2), size=length, mode="linear",
                      align_corners=False)  # [B, D, length]
    return y.transpose(1, 2)  # [B, length, D]


class Converter(nn.Module):
    """Student tokens ``[B, Ts, Ds]`` -> teacher-like tokens ``[B, Tt, Dt]``."""

    def __init__(self, in_dim: int, out_dim: int, in_tokens: int, out_tokens: int, *,
                 kind: str = "linear", hidden: int = 0):
        super().__init__()
        if kind not in CONVERTER_KINDS:
            raise ConfigError(f"--kind {kind!r}: expected one of {CONVERTER_KINDS}")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.in_tokens, self.out_tokens = in_tokens, out_tokens
        self.kind, self.hidden = kind, (hidden or 2 * max(in_dim, out_dim)) if kind == "mlp" else 0
        self.linear = nn.Linear(in_dim, out_dim)
        self.mlp = None
        if kind == "mlp":
            self.mlp = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, self.hidden),
                                     nn.GELU(), nn.Linear(self.hidden, out_dim))
            # Zero last layer: the converter starts as exactly the least-squares linear map.
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, student: torch.Tensor) -> torch.Tensor:
        x = resample_tokens(student, self.out_tokens)  # [B, Tt, Ds]
        y = self.linear(x)  # [B, Tt, Dt]
        if self.mlp is not None:
            y = y + self.mlp(x)
        return y

    def spec(self) -> dict:
        """The primitives that rebuild this converter (stored in the checkpoint)."""
        return {"in_dim": self.in_dim, "out_dim": self.out_dim, "in_tokens": self.in_tokens,
                "out_tokens": self.out_tokens, "kind": self.kind, "hidden": self.hidden}


def converter_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L2 plus cosine distance, both per token: the scale and the direction of the features."""
    cos = F.cosine_similarity(pred, target, dim=-1)  # [B, Tt]
    return F.mse_loss(pred, target) + (1.0 - cos).mean()


class LeastSquares:
    """Streaming normal equations for ``Y ~ X W + b``: memory is ``O(D^2)``, not ``O(samples)``."""

    def __init__(self, in_dim: int, out_dim: int):
        self.xtx = torch.zeros(in_dim + 1, in_dim + 1, dtype=torch.float64)
        self.xty = torch.zeros(in_dim + 1, out_dim, dtype=torch.float64)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add rows of already aligned tokens: ``x [B, Tt, Ds]``, ``y [B, Tt, Dt]``."""
        x = x.reshape(-1, x.shape[-1]).double()  # [B*Tt, Ds]
        y = y.reshape(-1, y.shape[-1]).double()  # [B*Tt, Dt]
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)  # [B*Tt, Ds+1], bias column
        self.xtx += x.T @ x
        self.xty += x.T @ y

    def solve_into(self, linear: nn.Linear) -> None:
        """Write the ridge solution into ``linear`` (weight ``[Dt, Ds]``, bias ``[Dt]``)."""
        # A ridge of 1e-4 of the mean diagonal keeps the solve stable when tokens are collinear.
        ridge = 1e-4 * self.xtx.diagonal().mean().clamp_min(1e-12)
        eye = torch.eye(len(self.xtx), dtype=self.xtx.dtype)
        w = torch.linalg.solve(self.xtx + ridge * eye, self.xty)  # [Ds+1, Dt]
        with torch.no_grad():
            linear.weight.copy_(w[:-1].T.float())
            linear.bias.copy_(w[-1].float())


class FeatureMoments:
    """Streaming per-channel mean and standard deviation of tokens ``[B, T, D]``."""

    def __init__(self, dim: int):
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.sumsq = torch.zeros(dim, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()  # [B*T, D]
        self.sum += x.sum(dim=0)
        self.sumsq += (x * x).sum(dim=0)
        self.count += len(x)

    def result(self) -> dict[str, torch.Tensor]:
        n = max(self.count, 1)
        mean = self.sum / n
        var = (self.sumsq / n - mean * mean).clamp_min(0.0)
        # a floor on the std keeps constant channels from blowing up after standardisation
        std = var.sqrt().clamp_min(1e-3 * float(var.sqrt().mean()) + 1e-12)
        return {"mean": mean.float(), "std": std.float()}


def converters_checkpoint(converters: dict[str, Converter], *, student: dict, val_cosine: dict,
                          config: dict, stats: dict | None = None) -> dict:
    """The checkpoint dict: kind, dims, teacher names and token counts, weights, metrics."""
    return {
        **checkpoint_header(CONVERTERS_KIND),
        "kind": next(iter(converters.values())).kind,
        "student": dict(student),  # {"backbone", "dim", "tokens"}
        "teachers": list(converters),
        "converters": {name: {**conv.spec(), "state_dict": conv.state_dict()}
                       for name, conv in converters.items()},
        "val_cosine": {k: float(v) for k, v in val_cosine.items()},
        "config": dict(config),
        # per-channel {"mean", "std"} of the training features, "student" and per teacher
        "stats": dict(stats or {}),
    }


def load_converters(path, *, student_dim: int, student_tokens: int,
                    teachers: list[str] | None = None) -> tuple[dict[str, Converter], dict]:
    """Frozen converters from a checkpoint, checked against the student that will feed them,
    and the per-channel ``{"mean", "std"}`` of the training features (``"student"`` and per
    teacher) recorded beside them.

    ``teachers`` picks (and orders) the teachers; ``None`` takes all, in checkpoint order.
    Raises ``ConfigError`` naming the file when a teacher is missing or a dimension differs.
    """
    ckpt = load_checkpoint(path, kind=CONVERTERS_KIND, argument="--converters")
    names = list(teachers) if teachers else list(ckpt["teachers"])
    problems = [f"--converters {path}: no converter for teacher {n!r} (it has {ckpt['teachers']}); "
                f"train one with `bombkd train-converters --teachers ...`"
                for n in names if n not in ckpt["converters"]]
    stu = ckpt["student"]
    if stu["dim"] != student_dim or stu["tokens"] != student_tokens:
        problems.append(
            f"--converters {path}: trained for a student of width {stu['dim']} and {stu['tokens']} "
            f"tokens ({stu.get('backbone')}), but the student gives width {student_dim} and "
            f"{student_tokens} tokens; train converters on features of this student")
    if problems:
        raise ConfigError(problems)
    out = {}
    for name in names:
        entry = dict(ckpt["converters"][name])
        state = entry.pop("state_dict")
        conv = Converter(entry["in_dim"], entry["out_dim"], entry["in_tokens"], entry["out_tokens"],
                         kind=entry["kind"], hidden=entry["hidden"])
        conv.load_state_dict(state)
        out[name] = conv.eval().requires_grad_(False)
    return out, ckpt.get("stats", {})


# --- training --------------------------------------------------------------------------------


@dataclass
class ConverterResult:
    path: Path                     # the checkpoint written
    cosine: dict[str, float]       # per teacher, mean token cosine on the held-out samples
    held_out: int                  # number of held-out samples (0: measured on the training set)


def held_out_mask(count: int, val_frac: float, seed: int) -> torch.Tensor:
    """Bool ``[count]``: which samples are held out, a seeded choice independent of the epoch."""
    n_val = min(count - 1, round(count * val_frac)) if val_frac > 0 else 0
    mask = torch.zeros(count, dtype=torch.bool)
    mask[torch.from_numpy(np.random.default_rng([seed, 7]).permutation(count)[:n_val])] = True
    return mask


def _build(cfg: ConverterTrainConfig, manifest) -> dict[str, Converter]:
    stu = manifest.models["student"]
    torch.manual_seed(cfg.seed)
    return {t: Converter(stu.dim, manifest.models[t].dim, stu.tokens, manifest.models[t].tokens,
                         kind=cfg.kind, hidden=cfg.hidden) for t in cfg.teachers}


def _rows(batch: dict, keep: torch.Tensor,
          device: str = "cpu") -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    """The samples of ``batch`` selected by ``keep[index]`` (on ``device``), or ``None``."""
    rows = keep[batch["index"]]
    if not bool(rows.any()):
        return None
    picked = {k: v[rows].to(device) for k, v in batch.items() if torch.is_tensor(v)}
    # features come in the cache dtype; cast on the device (exact)
    picked = {k: v.float() if v.is_floating_point() else v for k, v in picked.items()}
    return picked["student"], picked


def _fit_least_squares(loader, converters: dict[str, Converter], train: torch.Tensor, *,
                       progress: bool = True) -> dict:
    """Solve each converter's linear map; returns the feature statistics of the same pass."""
    fits = {t: LeastSquares(c.in_dim, c.out_dim) for t, c in converters.items()}
    first = next(iter(converters.values()))
    moments = {"student": FeatureMoments(first.in_dim),
               **{t: FeatureMoments(c.out_dim) for t, c in converters.items()}}
    loader.set_epoch(0)
    bar = tqdm(loader, desc="least squares", unit="batch", leave=False, disable=not progress)
    for batch in bar:
        picked = _rows(batch, train)
        if picked is not None:
            student, tensors = picked
            moments["student"].add(student)
            for t, conv in converters.items():
                fits[t].add(resample_tokens(student, conv.out_tokens), tensors[t])
                moments[t].add(tensors[t])
    for t, conv in converters.items():
        fits[t].solve_into(conv.linear)
    return {role: m.result() for role, m in moments.items()}


def _fine_tune(loader, converters: dict[str, Converter], train: torch.Tensor,
               cfg: ConverterTrainConfig) -> None:
    params = [p for c in converters.values() for p in c.parameters()]
    # No weight decay: it would pull the least-squares start towards zero.
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    for epoch in range(cfg.epochs):
        loader.set_epoch(epoch)
        bar = tqdm(loader, desc=f"converters epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                   disable=not cfg.progress)
        for batch in bar:
            picked = _rows(batch, train, cfg.device)
            if picked is None:
                continue
            student, tensors = picked
            loss = sum(converter_loss(c(student), tensors[t]) for t, c in converters.items())
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")


@torch.no_grad()
def _cosine(loader, converters: dict[str, Converter], rows: torch.Tensor,
            device: str) -> dict[str, float]:
    total = {t: 0.0 for t in converters}
    count = 0
    loader.set_epoch(0)
    for batch in loader:
        picked = _rows(batch, rows, device)
        if picked is None:
            continue
        student, tensors = picked
        count += len(student)
        for t, conv in converters.items():
            cos = F.cosine_similarity(conv(student), tensors[t], dim=-1)  # [b, Tt]
            total[t] += float(cos.mean(dim=1).sum())
    return {t: v / max(count, 1) for t, v in total.items()}


def train_converters(cfg: ConverterTrainConfig) -> ConverterResult:
    """Fit one converter per teacher: least-squares start, then ``epochs`` of L2 + cosine.
    One run per ``save_dir``: it is locked for the run (``bombkd_io.lock``)."""
    cfg.validate()
    cfg = replace(cfg, device=parse_device(cfg.device))
    with lock_folder(cfg.save_dir, argument="--save-dir"), \
            model_threads(cfg.device, cfg.loader_workers):  # a busy machine: see runtime.py
        return _train_converters(cfg)


def _train_converters(cfg: ConverterTrainConfig) -> ConverterResult:
    from bombkd_io.loaders.cached import make_cached_loader

    out = Path(cfg.save_dir) / "converters.pt"
    if out.exists():
        # fusion runs load their converters by this path (train --resume, eval): replacing the
        # file would silently change what they evaluate and resume with
        raise ConfigError(f"--save-dir {cfg.save_dir}: already holds converters.pt, which fusion "
                          "runs trained with it load by path; pass another --save-dir (or "
                          "delete the file to replace it)")
    remove_temps(cfg.save_dir, [out.name])  # the lock is ours: a killed run's half-written file
    # a teacher the cache lacks is a DatasetError here, naming what the cache holds
    loader = make_cached_loader(cfg.root, cfg.split, models=("student", *cfg.teachers),
                                batch_size=cfg.batch_size, seed=cfg.seed,
                                num_workers=cfg.loader_workers,
                                dataset=cfg.dataset)
    manifest = loader.manifest
    converters = _build(cfg, manifest)
    held = held_out_mask(manifest.count, cfg.val_frac, cfg.seed)
    train = ~held
    stats = _fit_least_squares(loader, converters, train, progress=cfg.progress)
    for conv in converters.values():
        conv.to(cfg.device).train()
    _fine_tune(loader, converters, train, cfg)
    for conv in converters.values():
        conv.cpu().eval()
    cosine = _cosine(loader, converters, held if bool(held.any()) else train, "cpu")
    stu = manifest.models["student"]
    ckpt = converters_checkpoint(
        converters, student={"backbone": stu.backbone, "dim": stu.dim, "tokens": stu.tokens},
        val_cosine=cosine, config=asdict(cfg), stats=stats)
    path = save_checkpoint(ckpt, out)
    return ConverterResult(path=path, cosine=cosine, held_out=int(held.sum()))
