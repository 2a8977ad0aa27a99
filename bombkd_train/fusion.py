"""The residual-gated fusion head (TC-BombKD).

For each teacher ``k`` (features converted from the student, ``[B, Tk, Dk]``):

- a low-rank projection ``Dk -> rank -> Ds`` brings the teacher tokens to the student width;
- a sigmoid gate, computed from the teacher tokens and the student tokens resampled to ``Tk``,
  decides per token and channel how much of the projection to let through;
- the gated projection is resampled back to the student's ``Ts`` tokens.

The sum over teachers is added to the student tokens, scaled by ``1/sqrt(K)`` so the residual's
size does not grow with the number of teachers; the result is mean-pooled over time and
classified by one linear layer. An L1 penalty on the gates (they are positive, so L1 is their
mean) keeps only the teachers that help.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from bombkd_train.converters import Converter, resample_tokens


@dataclass(frozen=True)
class TeacherSpec:
    name: str
    dim: int
    tokens: int


class TeacherBranch(nn.Module):
    """One teacher's low-rank projection and gate."""

    def __init__(self, teacher_dim: int, student_dim: int, rank: int):
        super().__init__()
        self.down = nn.Linear(teacher_dim, rank, bias=False)
        self.up = nn.Linear(rank, student_dim)
        self.gate = nn.Linear(teacher_dim + student_dim, student_dim)

    def forward(self, teacher: torch.Tensor,
                student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``teacher [B, Tk, Dk]``, ``student [B, Ts, Ds]`` -> gated ``[B, Ts, Ds]`` and the
        gate ``[B, Tk, Ds]``."""
        student_k = resample_tokens(student, teacher.shape[1])  # [B, Tk, Ds]
        gate = torch.sigmoid(self.gate(torch.cat([teacher, student_k], dim=-1)))  # [B, Tk, Ds]
        projected = self.up(self.down(teacher))  # [B, Tk, Ds]
        gated = resample_tokens(gate * projected, student.shape[1])  # [B, Ts, Ds]
        return gated, gate


@dataclass
class FusionOutput:
    logits: torch.Tensor             # [B, C]
    gates: dict[str, torch.Tensor]   # teacher -> mean gate value (scalar, differentiable)

    def gate_l1(self) -> torch.Tensor:
        """Mean absolute gate over teachers (the sparsity penalty)."""
        return torch.stack(list(self.gates.values())).mean()


class FusionHead(nn.Module):
    """Student tokens plus converted teacher tokens -> class logits."""

    def __init__(self, student_dim: int, teachers: list[TeacherSpec], num_classes: int, *,
                 rank: int = 64):
        super().__init__()
        if not teachers:
            raise ValueError("FusionHead needs at least one teacher")
        self.student_dim, self.num_classes, self.rank = student_dim, num_classes, rank
        self.teachers = list(teachers)
        self.teacher_names = [t.name for t in teachers]
        # ModuleDict keys cannot hold dots; index by position, keep the names beside.
        self.branches = nn.ModuleList(TeacherBranch(t.dim, student_dim, rank) for t in teachers)
        self.classifier = nn.Linear(student_dim, num_classes)
        self.scale = 1.0 / math.sqrt(len(teachers))

    def spec(self) -> dict:
        """The primitives that rebuild this head (stored in fusion checkpoints)."""
        return {"student_dim": self.student_dim, "num_classes": self.num_classes, "rank": self.rank,
                "teachers": [asdict(t) for t in self.teachers]}

    @classmethod
    def from_spec(cls, spec: dict) -> "FusionHead":
        return cls(spec["student_dim"], [TeacherSpec(**t) for t in spec["teachers"]],
                   spec["num_classes"], rank=spec["rank"])

    def forward(self, student: torch.Tensor, teachers: dict[str, torch.Tensor]) -> FusionOutput:
        """``student [B, Ts, Ds]``, ``teachers[name] [B, Tk, Dk]`` -> logits ``[B, C]``, gates."""
        residual = torch.zeros_like(student)  # [B, Ts, Ds]
        gates = {}
        for name, branch in zip(self.teacher_names, self.branches):
            gated, gate = branch(teachers[name], student)
            residual = residual + gated
            gates[name] = gate.mean()
        fused = student + self.scale * residual  # [B, Ts, Ds]
        pooled = fused.mean(dim=1)  # [B, Ds]
        return FusionOutput(logits=self.classifier(pooled), gates=gates)


class Standardize(nn.Module):
    """Fixed per-channel ``(x - mean) / std`` with the training set's statistics.

    The frozen backbones' features share a large offset and differ in small directions; the
    head learns in a few epochs only on standardised inputs. The statistics are fixed (not batch
    statistics), so both loaders and every rank see the same function.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("std", std.float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std  # [B, T, D]


class FusionModel(nn.Module):
    """Frozen converters feeding the trainable head: student tokens ``[B, Ts, Ds]`` -> output.

    ``stats``: per role (``"student"``, teacher names) ``{"mean", "std"}``; the head sees
    standardised student and converted-teacher tokens. Roles without statistics pass unchanged.
    """

    def __init__(self, converters: dict[str, Converter], head: FusionHead,
                 stats: dict[str, dict[str, torch.Tensor]] | None = None):
        super().__init__()
        if list(converters) != head.teacher_names:
            raise ValueError(f"converters {list(converters)} do not match the head's teachers "
                             f"{head.teacher_names}")
        self.teacher_names = list(converters)
        self.converters = nn.ModuleList(converters.values()).requires_grad_(False)
        stats = stats or {}
        self.norms = nn.ModuleList(
            Standardize(**stats[role]) if role in stats else nn.Identity()
            for role in ["student", *self.teacher_names])
        self.head = head

    def train(self, mode: bool = True) -> "FusionModel":
        super().train(mode)
        self.converters.eval()  # frozen, always in inference mode
        return self

    def forward(self, student: torch.Tensor) -> FusionOutput:
        with torch.no_grad():
            branches = zip(self.teacher_names, self.converters, self.norms[1:])
            teachers = {name: norm(conv(student)) for name, conv, norm in branches}  # [B, Tk, Dk]
            student = self.norms[0](student)  # [B, Ts, Ds]
        return self.head(student, teachers)


def teacher_specs(converters: dict[str, Converter]) -> list[TeacherSpec]:
    """What the head needs to know of each teacher: the converter's output width and tokens."""
    return [TeacherSpec(name, conv.out_dim, conv.out_tokens) for name, conv in converters.items()]
