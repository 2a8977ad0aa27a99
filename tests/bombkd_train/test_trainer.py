"""The one trainer on a real (synthetic) feature cache: determinism, resume, metrics, bad input."""
from __future__ import annotations

import json
from dataclasses import fields, replace

import pytest
import torch

from bombkd_io.errors import ConfigError
from bombkd_train.config import ConverterTrainConfig, DataConfig, TrainConfig
from bombkd_train.converters import train_converters
from bombkd_train.trainer import train
from synthetic_cache import TEACHERS, make_feature_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = make_feature_cache(tmp_path_factory.mktemp("cache"))
    make_feature_cache(root, split="val", count=20, seed=1)
    conv = train_converters(ConverterTrainConfig(root=str(root), split="train", teachers=list(TEACHERS),
                                                 save_dir=str(root / "conv"), epochs=1, batch_size=16))
    return root, conv.path


def _config(cache, tmp_path, **changes) -> TrainConfig:
    """The test run's config with ``changes``, to its data settings or its own."""
    root, conv = cache
    data = DataConfig(loader="wds", root=str(root), batch_size=8)
    cfg = TrainConfig(data=data, split="train", teachers=list(TEACHERS), converters=str(conv),
                      classes=4, epochs=2, lr=3e-3, save_dir=str(tmp_path / "run"), progress=False)
    ours = {f.name for f in fields(DataConfig)}
    data = replace(data, **{k: v for k, v in changes.items() if k in ours})
    return replace(cfg, data=data, **{k: v for k, v in changes.items() if k not in ours})


def _weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_learns_and_writes_metrics_and_checkpoints(cache, tmp_path):
    result = train(_config(cache, tmp_path, epochs=3, val_split="val"))
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("fusion_ep*.pt")) == [f"fusion_ep{i}.pt" for i in (1, 2, 3)]
    records = _records(run)
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(steps) == result.steps == 18 and [r["step"] for r in steps] == list(range(1, 19))
    assert {"epoch", "step", "loss", "top1", "samples_per_s"} <= set(steps[0])
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert set(epochs[-1]["gates"]) == set(TEACHERS) and all(0 < g < 1 for g in epochs[-1]["gates"].values())
    assert epochs[-1]["samples"] == 48 and "top5" in epochs[-1] and epochs[-1]["skipped"] == 0
    assert epochs[-1]["loss"] < epochs[0]["loss"]
    assert epochs[-1]["val_top1"] >= 75.0  # 4 classes: chance is 25%
    ckpt = torch.load(run / "fusion_ep3.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["step"] == 18 and ckpt["config"]["data"]["seed"] == 0
    assert {"model", "optimizer", "rng", "head"} <= set(ckpt)


def test_same_seed_same_weights_other_seed_other_weights(cache, tmp_path):
    a = train(_config(cache, tmp_path / "a", epochs=1)).checkpoint
    b = train(_config(cache, tmp_path / "b", epochs=1)).checkpoint
    c = train(_config(cache, tmp_path / "c", epochs=1, seed=1)).checkpoint
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_resume_ends_bit_identical_to_an_uninterrupted_run(cache, tmp_path):
    full = train(_config(cache, tmp_path / "full", epochs=2))
    train(_config(cache, tmp_path / "part", epochs=1))
    resumed = train(_config(cache, tmp_path / "part", epochs=2, resume=True))
    assert resumed.steps == full.steps == 12
    wf, wr = _weights(full.checkpoint), _weights(resumed.checkpoint)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    of = torch.load(full.checkpoint, weights_only=True)["optimizer"]["state"]
    orr = torch.load(resumed.checkpoint, weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(of[i]["exp_avg_sq"], orr[i]["exp_avg_sq"]) for i in of)
    losses = lambda d: [r["loss"] for r in _records(d) if r["kind"] == "step"]  # noqa: E731
    assert losses(tmp_path / "full" / "run") == losses(tmp_path / "part" / "run")


def test_resume_drops_the_metrics_logged_after_the_last_checkpoint(cache, tmp_path):
    train(_config(cache, tmp_path, epochs=1))
    run = tmp_path / "run"
    with open(run / "metrics.jsonl", "a") as f:  # an epoch-2 step of a run killed before its checkpoint
        f.write(json.dumps({"kind": "step", "epoch": 2, "step": 7, "loss": 9.0}) + "\n")
    train(_config(cache, tmp_path, epochs=2, resume=True))
    steps = [r["step"] for r in _records(run) if r["kind"] == "step"]
    assert steps == list(range(1, 13)) and 9.0 not in [r["loss"] for r in _records(run)]


def test_resume_from_another_configuration_is_refused(cache, tmp_path):
    train(_config(cache, tmp_path, epochs=1))
    with pytest.raises(ConfigError, match=r"another configuration.*lr"):
        train(_config(cache, tmp_path, epochs=2, resume=True, lr=1e-2))
    with pytest.raises(ConfigError, match="pass --resume"):
        train(_config(cache, tmp_path, epochs=2))


def test_resume_with_another_epoch_plan_is_refused(cache, tmp_path):
    first = train(_config(cache, tmp_path, epochs=1))
    plan = torch.load(first.checkpoint, weights_only=True)["plan"]
    assert plan == {"world_size": 1, "shard_size": 16, "batch": 8, "seed": 0, "num_samples": 48}
    with pytest.raises(ConfigError, match=r"epoch plan batch: 4 here, 8 .*epoch plan seed: 1 "):
        train(_config(cache, tmp_path, epochs=2, resume=True, batch_size=4, seed=1))
    # a checkpoint written before plans were saved: checked against what its config tells
    # (a flat config then: the data settings at the top, under their names of that time)
    old = torch.load(first.checkpoint, weights_only=True)
    del old["plan"]
    data = old["config"].pop("data")
    old["config"].update(batch=data["batch_size"], seed=data["seed"],
                         workers=data["loader_workers"])
    torch.save(old, first.checkpoint)
    with pytest.raises(ConfigError, match=r"epoch plan batch: 4 here, 8 in the checkpoint"):
        train(_config(cache, tmp_path, epochs=2, resume=True, batch_size=4))
    # loader workers only prefetch: another --workers is the same plan (and a checkpoint that
    # recorded its workers, as they once were part of the plan, resumes with any)
    old["plan"] = {**plan, "workers": 1}
    torch.save(old, first.checkpoint)
    assert train(_config(cache, tmp_path, epochs=2, resume=True, loader_workers=2)).epochs == 2


def test_resume_after_a_half_written_metrics_line(cache, tmp_path):
    train(_config(cache, tmp_path, epochs=1))
    run = tmp_path / "run"
    with open(run / "metrics.jsonl", "a") as f:  # killed while appending an epoch-2 step record
        f.write(json.dumps({"kind": "step", "epoch": 2, "step": 7, "loss": 9.0})[:20])
    train(_config(cache, tmp_path, epochs=2, resume=True))
    records = _records(run)  # every line decodes again
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(1, 13))
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]


def test_training_leaves_the_determinism_setting_as_it_found_it(cache, tmp_path):
    before = torch.are_deterministic_algorithms_enabled()
    train(_config(cache, tmp_path, epochs=1))
    assert torch.are_deterministic_algorithms_enabled() == before
    assert not torch.is_deterministic_algorithms_warn_only_enabled()


def test_bad_input_is_refused_before_the_first_step(cache, tmp_path):
    with pytest.raises(ConfigError, match="--classes 3: split 'train' has 4 classes"):
        train(_config(cache, tmp_path, classes=3))
    with pytest.raises(ConfigError, match="no such file"):
        train(_config(cache, tmp_path, converters=str(tmp_path / "nope.pt")))
    with pytest.raises(ConfigError, match="built with student 'tiny-student'"):
        train(_config(cache, tmp_path, student="tiny-other"))
    with pytest.raises(ConfigError, match="no converter for teacher 'tz'"):
        train(_config(cache, tmp_path, teachers=["ta", "tz"]))
    assert not (tmp_path / "run").exists()  # nothing written before the checks


def test_converters_for_another_student_are_refused(cache, tmp_path):
    from bombkd_train.checkpoint import save_checkpoint
    from bombkd_train.converters import Converter, converters_checkpoint

    convs = {t: Converter(32, s["dim"], 4, s["tokens"]) for t, s in TEACHERS.items()}
    path = save_checkpoint(converters_checkpoint(convs, student={"backbone": "x", "dim": 32, "tokens": 4},
                                                 val_cosine={}, config={}), tmp_path / "c.pt")
    with pytest.raises(ConfigError, match="width 32.*width 16"):
        train(_config(cache, tmp_path, converters=str(path)))


class _WithEmptyBatch:
    """The real cached loader, with an empty batch (what video mode yields under DDP when every
    clip of a rank's batch failed to decode) inserted after the first one."""

    def __init__(self, loader):
        self.loader = loader

    def set_epoch(self, epoch):
        self.loader.set_epoch(epoch)

    def num_batches(self, epoch):
        return self.loader.num_batches(epoch) + 1

    @property
    def skipped(self):
        return self.loader.skipped

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            yield batch
            if i == 0:
                yield {"student": batch["student"][:0], "label": batch["label"][:0],
                       "key": [], "index": batch["index"][:0]}


def test_an_empty_batch_is_a_zero_step_not_a_nan(cache, tmp_path):
    from bombkd_train.trainer import Trainer

    trainer = Trainer(_config(cache, tmp_path, epochs=1)).setup()
    trainer.source.loader = _WithEmptyBatch(trainer.source.loader)
    result = trainer.train()
    trainer.close()
    records = _records(tmp_path / "run")
    steps = [r for r in records if r["kind"] == "step"]
    assert result.steps == len(steps) + 1 == 7      # the empty batch took a step, logged none
    assert all(torch.isfinite(w).all() for w in _weights(result.checkpoint).values())
    assert records[-1]["samples"] == 48 and records[-1]["loss"] == records[-1]["loss"]  # not NaN
