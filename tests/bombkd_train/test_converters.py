"""Converters: token resampling, the least-squares start, checkpoints, and training on a real cache."""
from __future__ import annotations

import pytest
import torch

from bombkd_io.errors import ConfigError, DatasetError, FormatError
from bombkd_train.checkpoint import save_checkpoint
from bombkd_train.converters import (Converter, LeastSquares, converter_loss, converters_checkpoint,
                                     load_converters, resample_tokens)


def test_resample_tokens_is_identity_at_same_length_and_linear_otherwise():
    x = torch.arange(8.0).reshape(1, 4, 2)  # [B, T, D]
    assert resample_tokens(x, 4) is x
    y = resample_tokens(x, 2)
    assert y.shape == (1, 2, 2)
    # a linear ramp stays a linear ramp (half-pixel centres: mean of each pair)
    torch.testing.assert_close(y[0, :, 0], torch.tensor([1.0, 5.0]))
    assert resample_tokens(x, 8).shape == (1, 8, 2)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_converter_maps_token_count_and_width(kind):
    conv = Converter(16, 24, in_tokens=8, out_tokens=4, kind=kind)
    out = conv(torch.randn(3, 8, 16))
    assert out.shape == (3, 4, 24)


def test_mlp_converter_starts_as_its_linear_map():
    conv = Converter(8, 6, 4, 4, kind="mlp")
    x = torch.randn(2, 4, 8)
    torch.testing.assert_close(conv(x), conv.linear(x))


def test_least_squares_recovers_an_exact_linear_map():
    torch.manual_seed(0)
    w, b = torch.randn(12, 20), torch.randn(20)
    fit = LeastSquares(12, 20)
    for _ in range(5):
        x = torch.randn(16, 4, 12)  # [B, T, Ds]
        fit.add(x, x @ w + b)
    conv = Converter(12, 20, 4, 4)
    fit.solve_into(conv.linear)
    x = torch.randn(3, 4, 12)
    torch.testing.assert_close(conv(x), x @ w + b, atol=1e-3, rtol=1e-3)
    assert converter_loss(conv(x), x @ w + b) < 1e-4


def _checkpoint(tmp_path, dim=16, tokens=8):
    convs = {"t-a": Converter(dim, 24, tokens, 4), "t-b": Converter(dim, 10, tokens, 8, kind="mlp")}
    ckpt = converters_checkpoint(convs, student={"backbone": "tiny", "dim": dim, "tokens": tokens},
                                 val_cosine={"t-a": 0.5, "t-b": 0.25}, config={"seed": 0})
    return save_checkpoint(ckpt, tmp_path / "converters.pt"), convs


def test_checkpoint_round_trips_with_weights_only(tmp_path):
    path, convs = _checkpoint(tmp_path)
    raw = torch.load(path, weights_only=True)
    assert raw["teachers"] == ["t-a", "t-b"] and raw["student"]["dim"] == 16
    assert raw["converters"]["t-a"]["out_tokens"] == 4 and raw["converters"]["t-b"]["kind"] == "mlp"
    loaded, _ = load_converters(path, student_dim=16, student_tokens=8, teachers=["t-b", "t-a"])
    assert list(loaded) == ["t-b", "t-a"]
    x = torch.randn(2, 8, 16)
    for name, conv in loaded.items():
        assert not any(p.requires_grad for p in conv.parameters())
        torch.testing.assert_close(conv(x), convs[name](x))


def test_load_converters_rejects_other_student_and_missing_teacher(tmp_path):
    path, _ = _checkpoint(tmp_path)
    with pytest.raises(ConfigError, match="width 16"):
        load_converters(path, student_dim=32, student_tokens=8)
    with pytest.raises(ConfigError, match="no converter for teacher 'nope'"):
        load_converters(path, student_dim=16, student_tokens=8, teachers=["nope"])
    with pytest.raises(ConfigError, match="no such file"):
        load_converters(tmp_path / "missing.pt", student_dim=16, student_tokens=8)
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(FormatError, match="bombkd-converters"):
        load_converters(tmp_path / "other.pt", student_dim=16, student_tokens=8)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_train_converters_on_a_cache_with_other_token_counts_and_widths(tmp_path, kind):
    from bombkd_train.config import ConverterTrainConfig
    from bombkd_train.converters import train_converters
    from synthetic_cache import STUDENT, TEACHERS, make_feature_cache

    root = make_feature_cache(tmp_path / "cache")
    result = train_converters(ConverterTrainConfig(
        root=str(root), split="train", teachers=list(TEACHERS), save_dir=str(tmp_path / "out"),
        epochs=1, kind=kind, val_frac=0.25, batch_size=16))
    assert result.held_out == 12
    # the teachers are linear in the student: held-out cosine is ~1 after the least-squares start
    assert set(result.cosine) == set(TEACHERS) and min(result.cosine.values()) > 0.99
    raw = torch.load(result.path, weights_only=True)
    assert raw["kind"] == kind and raw["teachers"] == list(TEACHERS)
    assert set(raw["stats"]) == {"student", *TEACHERS} and raw["stats"]["ta"]["std"].shape == (24,)
    assert raw["student"] == {"backbone": STUDENT["backbone"], "dim": 16, "tokens": 4}
    assert {t: (c["out_dim"], c["out_tokens"]) for t, c in raw["converters"].items()} == {
        t: (s["dim"], s["tokens"]) for t, s in TEACHERS.items()}


def test_train_converters_refuses_a_teacher_the_cache_lacks(tmp_path):
    from bombkd_train.config import ConverterTrainConfig
    from bombkd_train.converters import train_converters
    from synthetic_cache import make_feature_cache

    root = make_feature_cache(tmp_path / "cache", count=16)
    with pytest.raises(DatasetError, match="no features for model 'nope'"):
        train_converters(ConverterTrainConfig(root=str(root), split="train", teachers=["ta", "nope"],
                                              save_dir=str(tmp_path / "out")))
    with pytest.raises(ConfigError, match="--val-frac 1.5"):
        ConverterTrainConfig(root=str(root), split="train", teachers=["ta"], save_dir="x",
                             val_frac=1.5).validate()


def test_checkpoints_are_atomic_and_refuse_pickled_code(tmp_path):
    from bombkd_train.checkpoint import FUSION_KIND as k
    from bombkd_train.checkpoint import checkpoint_header, load_checkpoint

    path = save_checkpoint({**checkpoint_header(k), "w": torch.ones(2)}, tmp_path / "a" / "c.pt")
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]  # no temporary file left
    assert torch.equal(load_checkpoint(path, kind=k, argument="--x")["w"], torch.ones(2))
    save_checkpoint({"format": k, "version": 2}, path)
    with pytest.raises(FormatError, match="version 2 is not supported"):
        load_checkpoint(path, kind=k, argument="--x")
    torch.save({**checkpoint_header(k), "obj": object()}, path)  # needs pickle to load
    with pytest.raises(FormatError, match="cannot be read as a checkpoint") as refused:
        load_checkpoint(path, kind=k, argument="--x")
    # names the option, and does not pass on torch's advice to load with weights_only=False
    assert str(refused.value).startswith(f"--x {path}: ") and "weights_only" not in str(refused.value)
    path.write_text('{"not": "a checkpoint"}')  # e.g. a manifest passed to --converters
    with pytest.raises(FormatError, match="cannot be read as a checkpoint") as refused:
        load_checkpoint(path, kind=k, argument="--x")
    assert str(refused.value).startswith(f"--x {path}: ") and "weights_only" not in str(refused.value)
    assert "\n" not in str(refused.value)


def test_train_converters_refuses_to_replace_converters_a_fusion_run_loads(tmp_path):
    # fusion checkpoints name their converters by path (train --resume, eval): a second
    # train-converters into the same --save-dir would silently change what they load
    from typer.testing import CliRunner

    from bombkd_train.cli.main import app
    from synthetic_cache import TEACHERS, make_feature_cache

    root = make_feature_cache(tmp_path / "cache", count=16)
    args = ["train-converters", "--root", str(root), "--split", "train", "--teachers",
            ",".join(TEACHERS), "--save-dir", str(tmp_path / "conv"), "--epochs", "0", "--quiet"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    path = tmp_path / "conv" / "converters.pt"
    before = path.read_bytes()
    again = CliRunner().invoke(app, [*args[:-3], "--epochs", "1", "--quiet", "--seed", "3"])
    assert again.exit_code == 2, again.output
    assert again.stderr.startswith(f"error: --save-dir {tmp_path / 'conv'}: already holds "
                                   "converters.pt"), again.stderr
    assert "pass another --save-dir" in again.stderr
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == [
        "converters.pt"]
