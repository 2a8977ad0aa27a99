"""Mid-epoch checkpoints and exact resume, in process: step checkpoints every N steps (the last K
kept), a resume from any of them ends as the uninterrupted run did, the newest readable one is
taken, and checkpoints of another configuration, plan, cache or world size are refused."""
from __future__ import annotations

import shutil
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch

from bombkd_io.errors import ConfigError, DataWarning
from bombkd_io.shards.manifest import load_manifest, save_manifest
from bombkd_train.config import ConverterTrainConfig, DataConfig, FeaturizeConfig, TrainConfig
from bombkd_train.converters import train_converters
from bombkd_train.featurize import featurize
from bombkd_train.trainer import train
from same_run import assert_same_run
from synthetic_cache import TEACHERS, make_feature_cache


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """fp32 and fp16 caches of the same 48 samples (3 shards of 16), converters fitted on one."""
    base = tmp_path_factory.mktemp("caches")
    roots = {dtype: make_feature_cache(base / dtype, dtype=dtype)
             for dtype in ("float32", "float16")}
    conv = train_converters(ConverterTrainConfig(root=str(roots["float32"]), split="train",
                                                 teachers=list(TEACHERS), epochs=0,
                                                 save_dir=str(base / "conv"), batch_size=16,
                                                 progress=False))
    return roots, conv.path


def _config(caches, run: Path, dtype="float32", **changes) -> TrainConfig:
    roots, conv = caches
    data = DataConfig(loader="wds", root=str(roots[dtype]), batch_size=8, device="cpu")
    cfg = TrainConfig(data=data, split="train", teachers=list(TEACHERS), converters=str(conv),
                      classes=4, epochs=2, lr=3e-3, save_dir=str(run), progress=False)
    ours = {f.name for f in fields(DataConfig)}
    data = replace(data, **{k: v for k, v in changes.items() if k in ours})
    return replace(cfg, data=data, **{k: v for k, v in changes.items() if k not in ours})


def _names(run: Path) -> list[str]:
    return sorted(p.name for p in run.glob("fusion_*.pt"))


def test_step_checkpoints_every_n_steps_keep_the_last_k(caches, tmp_path):
    # 6 steps an epoch: step checkpoints at 2 and 4 of each epoch (at 6 and 12 the epoch's
    # own checkpoint is written), the last 2 kept
    result = train(_config(caches, tmp_path / "run", save_every=2, keep=2))
    assert result.steps == 12 and result.stopped is None and result.save_s > 0
    assert _names(tmp_path / "run") == ["fusion_ep1.pt", "fusion_ep2.pt", "fusion_ep2_step10.pt",
                                        "fusion_ep2_step8.pt"]
    ckpt = torch.load(tmp_path / "run" / "fusion_ep2_step10.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 10 and ckpt["loader"]["batch"] == 4
    assert ckpt["loader"]["plan"] == {"seed": 0, "num_samples": 48, "shard_size": 16,
                                      "batch_size": 8, "world_size": 1}
    assert ckpt["sums"].shape == (1, 5 + len(TEACHERS)) and ckpt["sums"][0, 3] == 32
    assert len(ckpt["manifest_sha256"]) == 64


@pytest.mark.parametrize("dtype,workers", [("float32", 0), ("float16", 2)])
def test_resume_from_any_step_checkpoint_ends_as_the_uninterrupted_run(caches, tmp_path, dtype,
                                                                       workers):
    full = tmp_path / "full"
    train(_config(caches, full, dtype, loader_workers=workers, save_every=1, keep=100))
    # (none is written at an epoch's last step: the epoch checkpoint follows it)
    assert not list(full.glob("fusion_ep*_step6.pt")) and not list(full.glob("*_step12.pt"))
    for step in (1, 5, 7, 11):  # in epoch 1, and the first and last left in epoch 2
        run = tmp_path / f"from{step}"
        run.mkdir()
        # what a run killed after this step's checkpoint leaves: that checkpoint (and the
        # ones before it), and metrics written past it
        for p in full.glob(f"fusion_ep*_step{step}.pt"):
            shutil.copy(p, run)
        shutil.copy(full / "metrics.jsonl", run)
        result = train(_config(caches, run, dtype, loader_workers=workers, resume=True))
        assert result.steps == 12
        assert_same_run(full, run, "fusion_ep2.pt")


def test_a_half_written_newest_checkpoint_is_reported_and_the_one_before_used(caches, tmp_path):
    full, run = tmp_path / "full", tmp_path / "run"
    train(_config(caches, full))
    train(_config(caches, run, save_every=4, epochs=1))
    train(_config(caches, run, save_every=4, epochs=2, resume=True))  # a step 8 checkpoint
    (run / "fusion_ep2.pt").unlink()
    newest = run / "fusion_ep2_step8.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # cut short (a disk that filled up)
    with pytest.warns(DataWarning, match="fusion_ep2_step8.pt: cannot be read as a checkpoint"):
        result = train(_config(caches, run, resume=True))
    assert result.steps == 12
    assert_same_run(full, run, "fusion_ep2.pt")


def test_a_checkpoint_of_another_configuration_plan_or_cache_is_refused(caches, tmp_path):
    run = tmp_path / "run"
    train(_config(caches, run, save_every=4, epochs=1))
    with pytest.raises(ConfigError, match=r"lr: 0.01 here, 0.003 in the checkpoint"):
        train(_config(caches, run, resume=True, lr=1e-2))
    with pytest.raises(ConfigError, match=r"epoch plan batch: 4 here, 8 in the checkpoint"):
        train(_config(caches, run, resume=True, batch_size=4))
    # the cache changed since (here: a sample marked suspect); its manifest's hash tells
    roots, _ = caches
    cache = tmp_path / "cache"
    shutil.copytree(roots["float32"], cache)
    run2 = tmp_path / "run2"
    train(_config(caches, run2, root=str(cache), save_every=4, epochs=1))
    manifest = load_manifest(cache, "train")
    manifest.suspect = [{"path": "v0.webm", "reason": "decoded with warnings"}]
    save_manifest(manifest, cache)
    with pytest.raises(ConfigError, match=r"cache manifest sha256: [0-9a-f]{64} here, "
                                          r"[0-9a-f]{64} in the checkpoint \(the cache changed"):
        train(_config(caches, run2, root=str(cache), resume=True))


def test_another_world_size_resumes_an_epoch_checkpoint_but_not_a_step_one(caches, tmp_path):
    run = tmp_path / "run"
    train(_config(caches, run, save_every=4, epochs=1))
    train(_config(caches, run, save_every=4, epochs=2, resume=True))
    (run / "fusion_ep2.pt").unlink()
    # as if written by 2 ranks: the plan and one row of epoch sums per rank
    step = run / "fusion_ep2_step8.pt"
    ckpt = torch.load(step, weights_only=True)
    ckpt["plan"]["world_size"] = ckpt["loader"]["plan"]["world_size"] = 2
    ckpt["sums"] = ckpt["sums"].repeat(2, 1)
    torch.save(ckpt, step)
    with pytest.raises(ConfigError, match=r"stopped in the middle of epoch 2 with 2 rank\(s\), "
                                          r"this run has 1; resume with 2 rank\(s\) \(torchrun "
                                          r"--nproc_per_node 2\).*delete the step checkpoints "
                                          r"fusion_ep\*_step\*.pt .* from fusion_ep1.pt"):
        train(_config(caches, run, resume=True))
    for p in run.glob("fusion_ep*_step*.pt"):
        p.unlink()
    epoch = torch.load(run / "fusion_ep1.pt", weights_only=True)
    epoch["plan"]["world_size"] = 2
    torch.save(epoch, run / "fusion_ep1.pt")
    assert train(_config(caches, run, resume=True)).steps == 12  # epoch 2 with 1 rank's plan


def test_bad_checkpoint_settings_are_refused_before_any_io(caches, tmp_path):
    with pytest.raises(ConfigError) as err:
        train(_config(caches, tmp_path / "run", save_every=0, keep=0, save_every_minutes=0.0))
    assert err.value.problems == ["--save-every 0: must be >= 1", "--keep 0: must be >= 1",
                                  "--save-every-minutes 0.0: must be > 0"]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_video_mode_resumes_from_a_step_checkpoint_as_the_uninterrupted_run(sample_root,
                                                                             tmp_path):
    # the 12 training videos through the tiny student, replaying a cache's plan (6 shards of 2)
    cache = tmp_path / "cache"
    featurize(FeaturizeConfig(dataset="ucf101", root=str(sample_root), split="train",
                              student="tiny-vjepa2", out=str(cache), teachers=["tiny-vivit"],
                              shard_size=2, batch_size=3, decode_threads=2, progress=False))
    conv = train_converters(ConverterTrainConfig(root=str(cache), split="train",
                                                 teachers=["tiny-vivit"], epochs=0, val_frac=0.0,
                                                 save_dir=str(tmp_path / "conv"), progress=False))
    data = DataConfig(loader="dali", root=str(sample_root), dataset="ucf101",
                      student="tiny-vjepa2", cache=str(cache), batch_size=4, device="cpu")
    cfg = TrainConfig(data=data, split="train", teachers=["tiny-vivit"], converters=str(conv.path),
                      epochs=2, save_dir=str(tmp_path / "full"), save_every=1, keep=10,
                      progress=False)
    train(cfg)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tmp_path / "full" / "fusion_ep2_step4.pt", run)  # 1 batch into epoch 2
    shutil.copy(tmp_path / "full" / "metrics.jsonl", run)
    assert train(replace(cfg, save_dir=str(run), resume=True)).steps == 6
    assert_same_run(tmp_path / "full", run, "fusion_ep2.pt")
