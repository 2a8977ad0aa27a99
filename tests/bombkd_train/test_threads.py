"""torch's CPU threads beside our own threads and other programs, and the precision and
determinism the backbones and the trainer run with (bombkd_train/runtime.py)."""
from __future__ import annotations

import pytest
import torch

from bombkd_train.runtime import cpu_cores, model_threads, parity_settings, torch_threads_for
from bombkd_train.config import DataConfig, TrainConfig
from bombkd_train.trainer import Trainer
from synthetic_cache import make_feature_cache


@pytest.mark.parametrize("cores, reserved, want", [(1, 0, 1), (2, 0, 1), (2, 4, 1), (4, 0, 3),
                                                   (4, 1, 2), (16, 4, 11), (16, 100, 7)])
def test_torch_threads_leave_a_core(cores, reserved, want):
    assert torch_threads_for(reserved, cores) == want


def test_cores_are_shared_by_the_ranks_of_a_node(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    alone = cpu_cores()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cpu_cores() == max(1, alone // 2)


def test_model_threads_caps_and_restores():
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        with model_threads("cpu", 0) as n:
            assert n == torch.get_num_threads() == min(4, torch_threads_for(0))
        assert torch.get_num_threads() == 4
        with model_threads("cuda", 0) as n:  # a GPU run leaves the CPU side alone
            assert n == 4
    finally:
        torch.set_num_threads(before)


def _precision() -> tuple:
    return (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)


@pytest.mark.parametrize("before", [(False, False, True, True), (True, False, False, False)])
def test_parity_settings_sets_full_fp32_and_determinism_and_restores(before):
    saved = _precision()
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[2:]
    try:
        with parity_settings():
            assert _precision() == (True, True, False, False)
        assert _precision() == before
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[2:]


def test_trainer_holds_the_cap_and_parity_settings_until_closed(tmp_path):
    root = make_feature_cache(tmp_path / "cache", count=16, shard_size=8)
    before, precision = torch.get_num_threads(), _precision()
    torch.set_num_threads(4)
    try:
        cfg = TrainConfig(data=DataConfig(loader="wds", root=str(root), device="cpu"),
                          split="train", teachers=["ta"], converters=str(tmp_path / "none.pt"),
                          classes=4, save_dir=str(tmp_path / "run"), progress=False)
        trainer = Trainer(cfg)
        assert torch.get_num_threads() == min(4, torch_threads_for(0))
        assert _precision() == (True, True, False, False)
        trainer.close()
        assert torch.get_num_threads() == 4 and _precision() == precision
    finally:
        torch.set_num_threads(before)
