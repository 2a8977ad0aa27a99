"""DDP under torchrun: 2 CPU processes (gloo) see disjoint data and end with identical weights."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from bombkd_io.sampling import epoch_batches
from bombkd_train.config import ConverterTrainConfig, DataConfig, TrainConfig
from bombkd_train.converters import train_converters
from places import child_env
from synthetic_cache import TEACHERS, make_feature_cache


# Runs on every rank: train, recording which samples this rank's loader yielded.
RANK_SCRIPT = '''
import json, sys, torch
from bombkd_train.config import DataConfig, TrainConfig
from bombkd_train.trainer import Trainer

class Recording:
    """The rank's loader, unchanged, noting the sample indices it yields."""
    def __init__(self, loader):
        self.loader, self.seen, self.epoch = loader, {}, 0
    def set_epoch(self, epoch):
        self.epoch = epoch
        self.loader.set_epoch(epoch)
    def num_batches(self, epoch=None):
        return self.loader.num_batches(epoch)
    @property
    def skipped(self):
        return self.loader.skipped
    def __iter__(self):
        for batch in self.loader:
            self.seen.setdefault(self.epoch, []).extend(batch["index"].tolist())
            yield batch

fields, out = json.loads(sys.argv[1]), sys.argv[2]
cfg = TrainConfig(**{**fields, "data": DataConfig(**fields["data"])})
trainer = Trainer(cfg).setup()
trainer.source.loader = recording = Recording(trainer.source.loader)
trainer.train()
torch.save(trainer.head.state_dict(), f"{out}/rank{trainer.rank}.pt")
with open(f"{out}/seen{trainer.rank}.json", "w") as f:
    json.dump({"world": trainer.world, "seen": recording.seen}, f)
trainer.close()
'''


@pytest.mark.slow
def test_two_cpu_ranks_split_the_data_and_agree_on_the_weights(tmp_path):
    root = make_feature_cache(tmp_path / "cache", count=48, shard_size=8)
    make_feature_cache(root, split="val", count=16, shard_size=8, seed=1)
    conv = train_converters(ConverterTrainConfig(root=str(root), split="train", teachers=list(TEACHERS),
                                                 save_dir=str(tmp_path / "conv"), epochs=0, batch_size=16))
    data = DataConfig(loader="wds", root=str(root), batch_size=4, loader_workers=1, device="cpu")
    cfg = TrainConfig(data=data, split="train", teachers=list(TEACHERS), converters=str(conv.path),
                      classes=4, epochs=2, lr=3e-3, save_dir=str(tmp_path / "run"), val_split="val",
                      progress=False)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = child_env()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), json.dumps(asdict(cfg)), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    seen = [json.loads((tmp_path / f"seen{r}.json").read_text()) for r in (0, 1)]
    assert [s["world"] for s in seen] == [2, 2]
    for epoch in ("0", "1"):
        a, b = seen[0]["seen"][epoch], seen[1]["seen"][epoch]
        assert not set(a) & set(b), "the ranks read overlapping samples"
        assert sorted(a + b) == list(range(48)), "together the ranks read every sample once"
        for rank, got in enumerate((a, b)):  # each rank follows the shared plan
            plan = epoch_batches(0, int(epoch), 48, 8, 4, rank=rank, world_size=2)
            assert got == [int(i) for batch in plan for i in batch]
    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    ckpt = torch.load(tmp_path / "run" / "fusion_ep2.pt", weights_only=True)
    assert all(torch.equal(w0[k], ckpt["model"][k]) for k in w0)
    assert ckpt["plan"] == {"world_size": 2, "shard_size": 8, "batch": 4, "seed": 0,
                            "num_samples": 48}  # what --resume must match
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["samples"] for r in epochs] == [48, 48]  # summed over ranks
    assert [r["skipped"] for r in epochs] == [0, 0]
    assert [r["val_samples"] for r in epochs] == [16, 16]  # each rank evaluated its part
