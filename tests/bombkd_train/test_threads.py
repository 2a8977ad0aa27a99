"""torch's CPU threads beside our own threads and other programs (bombkd_train/runtime.py)."""
from __future__ import annotations

import pytest
import torch

from bombkd_train.runtime import cpu_cores, model_threads, torch_threads_for
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


def test_trainer_holds_the_cap_until_closed(tmp_path):
    root = make_feature_cache(tmp_path / "cache", count=16, shard_size=8)
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        cfg = TrainConfig(data=DataConfig(loader="wds", root=str(root), device="cpu"),
                          split="train", teachers=["ta"], converters=str(tmp_path / "none.pt"),
                          classes=4, save_dir=str(tmp_path / "run"), progress=False)
        trainer = Trainer(cfg)
        assert torch.get_num_threads() == min(4, torch_threads_for(0))
        trainer.close()
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)
