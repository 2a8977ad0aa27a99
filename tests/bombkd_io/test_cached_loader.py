"""Cached loader: exactly epoch_batches' order for any workers/ranks; zipped teachers; errors."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bombkd_io.errors import ConfigError, DatasetError, ShardError
from bombkd_io.loaders.cached import make_cached_loader
from bombkd_io.sampling import epoch_batches
from bombkd_io.shards.manifest import Manifest, ModelEntry, save_manifest
from bombkd_io.shards.writer import ShardSetWriter
from places import GOLDEN

N, S, B = 23, 4, 3  # 6 shards: enough for 2 ranks x 2 workers


def make_cache(root: Path, n=N, shard_size=S, *, labels=True, dtype="float16",
               teacher_keys=None) -> Path:
    """student [2, 4] = index + column, teacher "videomae" [1, 6] = -index; label = index % 5."""
    writers = {m: ShardSetWriter(root, "ds", "train", m, shard_size, dtype)
               for m in ("student", "videomae")}
    for i in range(n):
        key = f"{i:06d}_clip"
        extra = {"json": {"path": f"{key}.avi"}, **({"cls": i % 5} if labels else {})}
        writers["student"].write(key, i + np.tile(np.arange(4) / 4, (2, 1)), extra)
        writers["videomae"].write((teacher_keys or {}).get(i, key), np.full((1, 6), -i))
    models = {m: ModelEntry(m, "tiny", d, t, 4, 32, "time", dtype, writers[m].close())
              for m, (t, d) in {"student": (2, 4), "videomae": (1, 6)}.items()}
    save_manifest(Manifest("ds", "train", [f"c{k}" for k in range(5)], shard_size, models, n,
                           labels=labels), root)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("cache"))


def check_batch(b: dict, teachers: bool = False, dtype=torch.float16) -> None:
    idx = b["index"].numpy()  # features come in the cache's dtype
    assert b["student"].dtype == dtype and b["student"].shape == (len(idx), 2, 4)
    np.testing.assert_array_equal(b["student"][:, 0, :].numpy(), idx[:, None] + np.arange(4) / 4)
    assert b["label"].dtype == torch.int64 and (b["label"].numpy() == idx % 5).all()
    assert b["key"] == [f"{i:06d}_clip" for i in idx]
    if teachers:
        assert b["videomae"].shape == (len(idx), 1, 6)
        assert (b["videomae"][:, 0, 0].numpy() == -idx).all()


@pytest.mark.parametrize("num_workers", [0, 1, 2])
@pytest.mark.parametrize("world_size", [1, 2])
def test_order_is_epoch_batches(cache, num_workers, world_size):
    seen, steps = [], set()
    for rank in range(world_size):
        loader = make_cached_loader(cache, "train", batch_size=B, seed=7,
                                    num_workers=num_workers, rank=rank, world_size=world_size)
        loader.set_epoch(3)
        got = list(loader)
        plan = epoch_batches(7, 3, N, S, B, rank=rank, world_size=world_size)
        assert [b["index"].tolist() for b in got] == [p.tolist() for p in plan]
        assert len(got) == loader.num_batches() == len(loader)
        for b in got:
            check_batch(b)
        seen += [i for b in got for i in b["index"].tolist()]
        steps.add(len(got))
    assert sorted(seen) == list(range(N))  # every sample once over the ranks
    assert len(steps) == 1                 # every rank takes the same number of steps


def test_epochs_differ_and_repeat(cache):
    loader = make_cached_loader(cache, "train", batch_size=B, num_workers=0)
    orders = []
    for epoch in (0, 1, 0):
        loader.set_epoch(epoch)
        orders.append([i for b in loader for i in b["index"].tolist()])
    assert orders[0] == orders[2] != orders[1]
    assert sorted(orders[1]) == list(range(N))


def test_teachers_zip_with_the_student(cache):
    loader = make_cached_loader(cache, "train", models=("student", "videomae"), batch_size=5,
                                num_workers=1)
    batches = list(loader)
    assert sum(len(b["key"]) for b in batches) == N
    for b in batches:
        check_batch(b, teachers=True)


def test_teacher_keys_must_line_up(tmp_path):
    root = make_cache(tmp_path, teacher_keys={5: "000006_clip", 6: "000005_clip"})
    loader = make_cached_loader(root, "train", models=("student", "videomae"), num_workers=0)
    with pytest.raises(ShardError, match="do not line up") as info:
        list(loader)
    assert info.value.shard.endswith("ds-train-videomae-000001.tar")
    assert info.value.sample == "000006_clip"
    assert len(list(make_cached_loader(root, "train", num_workers=0))) > 0  # student alone: fine


def test_golden_cache_through_the_loader():
    loader = make_cached_loader(GOLDEN, "train", models=("student", "videomae"), batch_size=2,
                                num_workers=0)
    batches = list(loader)
    assert [len(b["key"]) for b in batches] == [2, 1]
    for b in batches:
        for row, i in enumerate(b["index"].tolist()):
            student = (np.arange(8).reshape(2, 4) - 3) * 0.5 + i
            np.testing.assert_array_equal(b["student"][row].numpy(), student)
            teacher = np.array([[-1, -0.5, 0, 0.25, 1, 2]]) * (i + 1)
            np.testing.assert_array_equal(b["videomae"][row].numpy(), teacher)
            assert b["label"][row] == [0, 1, 0][i]


def test_float32_cache_is_exact(tmp_path):
    root = make_cache(tmp_path, n=6, dtype="float32")
    seen = 0
    for b in make_cached_loader(root, "train", models=("student", "videomae"), num_workers=0):
        check_batch(b, teachers=True, dtype=torch.float32)
        seen += len(b["key"])
    assert seen == 6
    # values fp16 cannot hold come back bit for bit: nothing on the way goes through fp16
    fine = np.float32(1 + 2 ** -20)
    writer = ShardSetWriter(tmp_path / "fine", "ds", "train", "student", 4, "float32")
    writer.write("000000_clip", np.full((2, 4), fine, np.float32), {"cls": 0, "json": {}})
    entry = ModelEntry("student", "tiny", 4, 2, 4, 32, "time", "float32", writer.close())
    save_manifest(Manifest("ds", "train", ["c0"], 4, {"student": entry}, 1), tmp_path / "fine")
    (batch,) = list(make_cached_loader(tmp_path / "fine", "train", num_workers=0))
    assert np.float16(fine) != fine and (batch["student"].numpy() == fine).all()


def test_errors_before_training(cache, tmp_path):
    with pytest.raises(DatasetError, match=r"'vivit'.*\['student', 'videomae'\]"):
        make_cached_loader(cache, "train", models=("student", "vivit"))
    with pytest.raises(ConfigError, match="must name 'student'"):
        make_cached_loader(cache, "train", models=("videomae",))
    with pytest.raises(ConfigError, match="too few"):
        make_cached_loader(cache, "train", num_workers=4, world_size=7, rank=0)
    with pytest.raises(ConfigError) as info:
        make_cached_loader(cache, "train", batch_size=0, rank=2, world_size=2, on_error="ignore")
    assert len(info.value.problems) == 3
    unlabelled = make_cache(tmp_path / "nolabels", n=4, labels=False)
    with pytest.raises(DatasetError, match="split .train. has no labels in this cache.*labelled --split"):
        make_cached_loader(unlabelled, "train")
    with pytest.raises(DatasetError, match="no manifest"):
        make_cached_loader(tmp_path, "train")


def test_rank_and_world_size_from_torch_distributed(cache):
    from torch.testing._internal.distributed.fake_pg import FakeStore

    torch.distributed.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)
    try:
        loader = make_cached_loader(cache, "train", batch_size=B, num_workers=0)
        explicit = make_cached_loader(cache, "train", batch_size=B, num_workers=0, rank=0)
    finally:
        torch.distributed.destroy_process_group()
    assert (loader.dataset.rank, loader.dataset.world_size) == (1, 2)
    assert (explicit.dataset.rank, explicit.dataset.world_size) == (0, 2)
    plan = epoch_batches(0, 0, N, S, B, rank=1, world_size=2)
    assert [b["index"].tolist() for b in loader] == [p.tolist() for p in plan]


def test_corrupt_shard_raises_or_skips(cache, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(cache, root)
    path = root / "ds-train-student-000002.tar"
    raw = bytearray(path.read_bytes())
    raw[2560:2562] = b"\xc1\xc1"  # first sample's features (index 8) no longer msgpack
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="000008_clip"):
        list(make_cached_loader(root, "train", num_workers=0))
    loader = make_cached_loader(root, "train", num_workers=0, on_error="skip")
    with pytest.warns(RuntimeWarning, match="skipped 1 sample"):
        seen = [i for b in loader for i in b["index"].tolist()]
    assert sorted(seen) == [i for i in range(N) if i != 8] and loader.skipped == 1
    loader = make_cached_loader(root, "train", num_workers=2, on_error="skip")
    for epoch in (0, 1):  # counted in the workers, reported per epoch
        loader.set_epoch(epoch)
        seen = [i for b in loader for i in b["index"].tolist()]
        assert sorted(seen) == [i for i in range(N) if i != 8] and loader.skipped == 1


def test_pin_memory_without_cuda_warns(cache):
    if torch.cuda.is_available():
        batch = next(iter(make_cached_loader(cache, "train", pin_memory=True, num_workers=0)))
        assert batch["student"].is_pinned()
    else:
        with pytest.warns(UserWarning, match="pin_memory"):
            make_cached_loader(cache, "train", pin_memory=True)


def test_missing_shard_raises_or_skips(cache, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(cache, root)
    (root / "ds-train-student-000001.tar").unlink()  # samples 4..7
    with pytest.raises(ShardError, match="ds-train-student-000001.tar.*cannot read"):
        list(make_cached_loader(root, "train", num_workers=0))
    loader = make_cached_loader(root, "train", num_workers=0, on_error="skip")
    with pytest.warns(RuntimeWarning, match="skipped 4 sample"):
        seen = sorted(i for b in loader for i in b["index"].tolist())
    assert seen == [i for i in range(N) if not 4 <= i < 8] and loader.skipped == 4


@pytest.mark.parametrize("workers", [0, 2])
def test_uneven_ranks_take_the_same_steps_with_empty_batches(tmp_path, workers):
    # 21 samples in shards of 10 (the last holds 1) over 2 ranks, batch 4: in some epochs one
    # rank reads only the 1-sample shard and must still take as many steps as the other
    root = make_cache(tmp_path / "c", n=21, shard_size=10)
    for epoch in range(6):
        per_rank = []
        for rank in range(2):
            loader = make_cached_loader(root, "train", batch_size=4, num_workers=workers,
                                        rank=rank, world_size=2)
            loader.set_epoch(epoch)
            batches = [b["index"].tolist() for b in loader]
            assert len(batches) == loader.num_batches(epoch)
            plan = epoch_batches(0, epoch, 21, 10, 4, rank=rank, world_size=2)
            assert batches == [p.tolist() for p in plan]
            per_rank.append(batches)
        assert len(per_rank[0]) == len(per_rank[1])
        assert sorted(i for b in per_rank for x in b for i in x) == list(range(21))
