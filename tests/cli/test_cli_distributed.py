"""`bombkd train` under torchrun: one report from rank 0, not one per rank."""
from __future__ import annotations

import subprocess
import sys

import pytest

from bombkd_train.config import ConverterTrainConfig
from bombkd_train.converters import train_converters
from places import child_env
from synthetic_cache import TEACHERS, make_feature_cache



@pytest.mark.slow
def test_torchrun_train_prints_one_report(tmp_path):
    root = make_feature_cache(tmp_path / "cache", count=32, shard_size=8)
    conv = train_converters(ConverterTrainConfig(root=str(root), split="train",
                                                 teachers=list(TEACHERS),
                                                 save_dir=str(tmp_path / "conv"), epochs=0,
                                                 batch_size=16))
    script = tmp_path / "bombkd_cli.py"
    script.write_text("from bombkd_train.cli.main import app\napp()\n")
    env = child_env()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), "train", "--loader", "wds", "--root", str(root), "--split", "train",
         "--teachers", ",".join(TEACHERS), "--converters", str(conv.path), "--classes", "4",
         "--batch", "4", "--epochs", "1", "--save-dir", str(tmp_path / "run"),
         "--device", "cpu", "--quiet"],
        env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # before the fix rank 1 also printed its epoch line and "nothing to do: ... already holds"
    assert "nothing to do" not in proc.stdout, proc.stdout
    assert proc.stdout.count("epoch 1:") == 1, proc.stdout
    assert proc.stdout.count("wrote ") == 1, proc.stdout
    assert (tmp_path / "run" / "fusion_ep1.pt").is_file()
