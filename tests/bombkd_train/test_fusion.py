"""The residual-gated fusion head, on in-memory tensors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bombkd_train.converters import Converter
from bombkd_train.fusion import FusionHead, FusionModel, TeacherSpec, teacher_specs

TEACHERS = [TeacherSpec("a", 24, 4), TeacherSpec("b", 12, 16), TeacherSpec("c", 16, 8)]


def _inputs(batch=3):
    student = torch.randn(batch, 8, 16)  # [B, Ts, Ds]
    return student, {t.name: torch.randn(batch, t.tokens, t.dim) for t in TEACHERS}


def test_shapes_and_gates():
    torch.manual_seed(0)
    head = FusionHead(16, TEACHERS, num_classes=5, rank=4)
    out = head(*_inputs())
    assert out.logits.shape == (3, 5)
    assert list(out.gates) == ["a", "b", "c"]
    for g in out.gates.values():
        assert g.ndim == 0 and 0.0 < g.item() < 1.0
    torch.testing.assert_close(out.gate_l1(), torch.stack(list(out.gates.values())).mean())
    assert head.scale == pytest.approx(1 / math.sqrt(3))


def test_head_without_residual_is_the_student_classifier():
    """Zero projections leave exactly the mean-pooled student through the classifier."""
    head = FusionHead(16, TEACHERS, num_classes=5, rank=4)
    for branch in head.branches:
        torch.nn.init.zeros_(branch.up.weight)
        torch.nn.init.zeros_(branch.up.bias)
    student, teachers = _inputs()
    torch.testing.assert_close(head(student, teachers).logits, head.classifier(student.mean(dim=1)))


def test_gradients_reach_every_trainable_parameter():
    head = FusionHead(16, TEACHERS, num_classes=5, rank=4)
    out = head(*_inputs())
    (F.cross_entropy(out.logits, torch.tensor([0, 1, 2])) + 0.1 * out.gate_l1()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_spec_round_trip():
    head = FusionHead(16, TEACHERS, num_classes=5, rank=4)
    again = FusionHead.from_spec(head.spec())
    again.load_state_dict(head.state_dict())
    student, teachers = _inputs()
    torch.testing.assert_close(again(student, teachers).logits, head(student, teachers).logits)


def test_fusion_model_keeps_converters_frozen_and_learns():
    torch.manual_seed(0)
    convs = {"a": Converter(16, 24, 8, 4), "b": Converter(16, 12, 8, 16, kind="mlp")}
    model = FusionModel(convs, FusionHead(16, teacher_specs(convs), num_classes=3, rank=8)).train()
    assert not model.converters.training
    frozen = [p.clone() for p in model.converters.parameters()]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.arange(24) % 3
    student = torch.randn(24, 8, 16) + 2.0 * F.one_hot(labels, 16)[:, None, :].float()  # [B, Ts, Ds]
    for _ in range(60):
        loss = F.cross_entropy(model(student).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (model(student).logits.argmax(1) == labels).float().mean() == 1.0
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.converters.parameters()))


def test_fusion_model_standardises_the_head_inputs_with_fixed_statistics():
    convs = {"a": Converter(16, 24, 8, 4)}
    head = FusionHead(16, teacher_specs(convs), num_classes=3, rank=4)
    stats = {"student": {"mean": torch.full((16,), 5.0), "std": torch.full((16,), 2.0)},
             "a": {"mean": torch.zeros(24), "std": torch.full((24,), 4.0)}}
    model = FusionModel(convs, head, stats).eval()
    student = torch.randn(2, 8, 16) * 2.0 + 5.0
    expected = head((student - 5.0) / 2.0, {"a": convs["a"](student) / 4.0}).logits
    torch.testing.assert_close(model(student).logits, expected)
    # the statistics are buffers, not parameters: the optimizer never sees them
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("norms"))
