"""Video mode (--loader dali) and cached mode (--loader wds) give the same batches, features
and losses for the same seed, within DESIGN.md's tolerances."""
from __future__ import annotations

import json
import threading
import warnings
from pathlib import Path

import pytest
import torch

from bombkd_io.errors import DataWarning
from bombkd_io.shards.manifest import load_manifest
from bombkd_io.shards.reader import read_meta
from bombkd_train.backbones import Backbone
from bombkd_train.config import ConverterTrainConfig, DataConfig, FeaturizeConfig, TrainConfig
from bombkd_train.converters import train_converters
from bombkd_train.data import open_source
from bombkd_train.featurize import featurize
from bombkd_train.trainer import train

STUDENT, TEACHER = "tiny-vjepa2", "tiny-vivit"


@pytest.fixture(scope="module")
def data(tmp_path_factory, sample_root):
    """The 12 training videos of ``sample_root``, and fp32 and fp16 caches of them in shards
    of 4 (so 3 shards)."""
    base = tmp_path_factory.mktemp("parity")
    videos = sample_root
    caches = {}
    for dtype in ("float32", "float16"):
        caches[dtype] = base / dtype
        featurize(FeaturizeConfig(dataset="ucf101", root=str(videos), split="train", student=STUDENT,
                                  out=str(caches[dtype]), teachers=[TEACHER], shard_size=4,
                                  dtype=dtype, batch_size=3, decode_threads=2))
    conv = train_converters(ConverterTrainConfig(root=str(caches["float32"]), split="train",
                                                 teachers=[TEACHER], save_dir=str(base / "conv"),
                                                 epochs=0, val_frac=0.0))
    return videos, caches, conv.path


def _sources(data, dtype, workers=0, seed=3):
    videos, caches, _ = data
    common = dict(batch_size=3, loader_workers=workers, seed=seed, student=STUDENT, device="cpu")
    wds = open_source(DataConfig(loader="wds", root=str(caches[dtype]), **common), "train")
    dali = open_source(DataConfig(loader="dali", root=str(videos), dataset="ucf101",
                                  cache=str(caches[dtype]), **common), "train")
    return wds.loader, dali.loader


def _decode_threads() -> int:
    """Live threads of ClipLoaders (those left open, or still shutting down)."""
    return sum(t.name.startswith("bombkd-pyav") for t in threading.enumerate())


def _epochs(loader, epochs=(0, 1)):
    out = []
    for e in epochs:
        loader.set_epoch(e)
        out.extend(loader)
    return out


@pytest.mark.slow
def test_same_seed_same_batches_and_fp32_features(data):
    cached, video = _sources(data, "float32")
    a, b = _epochs(cached), _epochs(video)
    assert [x["index"].tolist() for x in a] == [x["index"].tolist() for x in b]
    assert [x["key"] for x in a] == [x["key"] for x in b]
    assert all(torch.equal(x["label"], y["label"]) for x, y in zip(a, b))
    assert sorted(i for x in a[:len(a) // 2] for i in x["index"].tolist()) == list(range(12))
    assert [x["index"].tolist() for x in a[:4]] != [x["index"].tolist() for x in a[4:]]  # reshuffled
    diff = max(float((x["student"] - y["student"]).abs().max()) for x, y in zip(a, b))
    assert diff <= 1e-5


@pytest.mark.slow
def test_fp16_cache_features_are_the_video_features_rounded(data):
    cached, video = _sources(data, "float16")
    for x, y in zip(_epochs(cached, (0,)), _epochs(video, (0,))):
        assert x["index"].tolist() == y["index"].tolist()
        # one fp16 rounding step: half an ulp, 2^-11 relative (plus the subnormal floor)
        bound = y["student"].abs() * 2.0 ** -11 + 2.0 ** -24
        assert bool(((x["student"] - y["student"]).abs() <= bound).all())


@pytest.mark.slow
def test_workers_change_no_batch_in_either_mode(data):
    cached, video = _sources(data, "float32", workers=2)
    plain, _ = _sources(data, "float32", workers=0)
    got, want = _epochs(cached, (0,)), _epochs(plain, (0,))
    assert [x["index"].tolist() for x in got] == [x["index"].tolist() for x in want] == \
        [x["index"].tolist() for x in _epochs(video, (0,))]
    assert all(torch.equal(x["student"], y["student"]) for x, y in zip(got, want))


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-4), ("float16", 1e-2)])
def test_step_losses_agree(data, tmp_path, dtype, tolerance):
    videos, caches, conv = data
    losses = {}
    for mode, root in (("wds", caches[dtype]), ("dali", videos)):
        data_cfg = DataConfig(loader=mode, root=str(root), dataset="ucf101", student=STUDENT,
                              batch_size=3, seed=3, cache=str(caches[dtype]), device="cpu")
        cfg = TrainConfig(data=data_cfg, split="train", teachers=[TEACHER], converters=str(conv),
                          classes=6, epochs=2, lr=3e-3, save_dir=str(tmp_path / mode),
                          progress=False)
        train(cfg)
        records = [json.loads(x) for x in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        losses[mode] = [r["loss"] for r in records if r["kind"] == "step"]
    assert len(losses["wds"]) == len(losses["dali"]) == 8
    rel = max(abs(a - b) / abs(b) for a, b in zip(losses["wds"], losses["dali"]))
    assert rel <= tolerance


@pytest.mark.slow
def test_eval_gives_the_same_confusion_matrix_in_both_modes(data, tmp_path):
    from bombkd_train.config import EvalConfig
    from bombkd_train.evaluate import evaluate

    videos, caches, conv = data
    data_cfg = DataConfig(loader="wds", root=str(caches["float32"]), batch_size=3, seed=3,
                          device="cpu")
    run = train(TrainConfig(data=data_cfg, split="train", teachers=[TEACHER], converters=str(conv),
                            classes=6, epochs=1, save_dir=str(tmp_path / "run"), progress=False))
    results = {}
    for mode, root in (("wds", caches["float32"]), ("dali", videos)):
        data_cfg = DataConfig(loader=mode, root=str(root), dataset="ucf101", batch_size=4,
                              device="cpu")
        before = _decode_threads()
        results[mode], path = evaluate(EvalConfig(data=data_cfg, split="train", fusion=str(run.checkpoint),
                                                  out=str(tmp_path / mode), progress=False))
        assert _decode_threads() <= before  # evaluate closed its loader
        assert path.is_file() and (path.parent / "confusion.png").is_file()
        assert sorted(p.name for p in path.parent.iterdir()) == ["confusion.png", "eval.json"]
    assert results["wds"].count == results["dali"].count == 12
    assert results["wds"].confusion == results["dali"].confusion


@pytest.mark.slow
def test_an_unreadable_video_is_left_out_the_same_way_in_both_modes(tmp_path, sample_root):
    import shutil

    from bombkd_io.datasets import index_dataset

    videos = tmp_path / "videos"
    shutil.copytree(sample_root, videos)
    first = Path(index_dataset("ucf101", videos, "train").items[3].path)
    first.write_bytes(first.read_bytes()[:300])  # a header and no frames
    cache = tmp_path / "cache"
    before = _decode_threads()
    manifest = featurize(FeaturizeConfig(dataset="ucf101", root=str(videos), split="train",
                                         student=STUDENT, out=str(cache), shard_size=4,
                                         dtype="float32", batch_size=3, decode_threads=2))
    assert _decode_threads() <= before  # featurize closed its clip loaders
    common = dict(batch_size=3, seed=1, student=STUDENT, device="cpu")
    cached = open_source(DataConfig(loader="wds", root=str(cache), **common), "train")
    video = open_source(DataConfig(loader="dali", root=str(videos), dataset="ucf101",
                                   cache=str(cache), **common), "train")
    plain = open_source(DataConfig(loader="dali", root=str(videos), dataset="ucf101",
                                   shard_size=4, **common), "train")  # no cache: probing decides
    assert [f["path"] for f in manifest.failed] == [str(first)]
    assert [f["path"] for f in plain.failed] == [str(first)]  # probing records it too
    assert cached.num_samples == video.num_samples == plain.num_samples == 11
    keys = lambda loader: [k for b in _epochs(loader, (0,)) for k in b["key"]]  # noqa: E731
    assert keys(cached.loader) == keys(video.loader) == keys(plain.loader)
    assert not any(first.stem in k for k in keys(video.loader))


@pytest.mark.slow
def test_too_many_ranks_are_refused_at_once_the_same_way_in_both_modes(data):
    from bombkd_io.errors import ConfigError

    videos, caches, _ = data
    common = dict(batch_size=3, loader_workers=4, student=STUDENT, device="cpu")  # 3 shards of 4
    for cfg in (DataConfig(loader="wds", root=str(caches["float32"]), **common),
                DataConfig(loader="dali", root=str(videos), dataset="ucf101", shard_size=4, **common),
                DataConfig(loader="dali", root=str(videos), dataset="ucf101",
                           cache=str(caches["float32"]), **common)):
        with pytest.raises(ConfigError, match=r"3 shard\(s\), too few for 4 rank\(s\)"):
            open_source(cfg, "train", rank=0, world_size=4)


@pytest.mark.slow
def test_video_mode_refuses_videos_that_are_not_the_caches_samples(data, tmp_path):
    import shutil

    from bombkd_io.errors import ConfigError

    videos, caches, _ = data
    other = tmp_path / "videos"
    shutil.copytree(videos, other)
    split = other / "ucfTrainTestlist" / "trainlist01.txt"
    split.write_text("".join(split.read_text().splitlines(keepends=True)[1:]))  # one video less
    cfg = DataConfig(loader="dali", root=str(other), dataset="ucf101", cache=str(caches["float32"]),
                     batch_size=3, student=STUDENT, device="cpu")
    manifest = caches["float32"] / "ucf101-train.index.json"
    with pytest.raises(ConfigError, match=rf"11 train videos in {other} decode, the cache "
                                          rf"{manifest} holds 12 samples"):
        open_source(cfg, "train")


@pytest.mark.slow
def test_videos_a_cache_left_out_are_matched_in_a_moved_dataset(sample_root):
    from bombkd_io.datasets import index_dataset, match_paths
    from bombkd_train.data import VideoFeatureLoader

    index = index_dataset("ucf101", sample_root, "train")
    rel = Path(index.items[3].path).relative_to(sample_root)
    elsewhere = str(Path("/mnt/old/datasets/ucf") / rel)  # where the cache was made
    assert match_paths(index, [elsewhere, "/mnt/old/datasets/ucf/X/gone.webm"]) == \
        ({3}, ["/mnt/old/datasets/ucf/X/gone.webm"])
    loader = VideoFeatureLoader("ucf101", sample_root, "train", student=STUDENT, batch_size=4,
                                shard_size=4, exclude=[elsewhere])
    try:
        assert loader.num_samples == 11 and 3 not in loader.positions
        keys = [k for b in loader for k in b["key"]]
        assert len(keys) == 11 and not any(k.startswith("000003_") for k in keys)
        assert loader.skipped == 0
    finally:
        loader.close()


@pytest.mark.slow
def test_closing_the_trainer_releases_the_video_decoder(data, tmp_path):
    from bombkd_train.trainer import Trainer

    videos, caches, conv = data
    data_cfg = DataConfig(loader="dali", root=str(videos), dataset="ucf101", student=STUDENT,
                          batch_size=3, seed=3, cache=str(caches["float32"]), device="cpu")
    trainer = Trainer(TrainConfig(data=data_cfg, split="train", teachers=[TEACHER],
                                  converters=str(conv), classes=6, epochs=1,
                                  save_dir=str(tmp_path / "run"), progress=False))
    clips = trainer.setup().source.loader.clips
    assert trainer.train().last["skipped"] == 0
    assert clips.decode_batch([0]).positions == [0]
    trainer.close()
    trainer.close()  # twice is harmless
    with pytest.raises(RuntimeError, match="shutdown"):  # a closed loader decodes no more
        clips.decode_batch([0])


def _precision() -> tuple:
    return (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)


FULL_FP32 = (True, True, False, False)  # deterministic (warn only), no TF32 anywhere


@pytest.mark.slow
def test_the_cache_records_each_clips_decoder_and_replaying_it_here_does_not_warn(data):
    _, caches, _ = data
    shards = load_manifest(caches["float32"], "train").models["student"].shards
    recorded = {key: doc["decoded_by"] for s in shards
                for key, doc in read_meta(caches["float32"] / s.name)}
    # the sample training videos' codecs (vp9, mjpeg) all take DALI's CPU decoder
    assert len(recorded) == 12 and set(recorded.values()) == {"dali/cpu"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        cached, video = _sources(data, "float32")
    video.close()


@pytest.mark.slow
def test_a_cache_decoded_on_a_gpu_warns_once_here_and_every_student_run_is_full_fp32(
        tmp_path, sample_root, monkeypatch):
    import bombkd_io.video.clips as clips

    seen = []  # the settings in force at each backbone call

    def hook(module, args, output):
        if isinstance(module, Backbone):
            seen.append(_precision())

    outside = _precision()
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        with monkeypatch.context() as patch:  # as if featurized on a GPU, through NVDEC
            patch.setattr(clips, "decoder_of", lambda info, caps: "dali/mixed")
            featurize(FeaturizeConfig(dataset="ucf101", root=str(sample_root), split="train",
                                      student=STUDENT, out=str(tmp_path / "gpu"), shard_size=4,
                                      dtype="float32", batch_size=3, decode_threads=2))
        assert seen and set(seen) == {FULL_FP32} and _precision() == outside
        seen.clear()
        with pytest.warns(DataWarning) as record:
            video = open_source(DataConfig(loader="dali", root=str(sample_root), dataset="ucf101",
                                           cache=str(tmp_path / "gpu"), batch_size=3,
                                           student=STUDENT, device="cpu"), "train")
        parity = [str(w.message) for w in record if issubclass(w.category, DataWarning)]
        assert len(parity) == 1 and "12 of the 12 samples" in parity[0]
        assert "dali/mixed there" in parity[0] and "within the GPU tolerance" in parity[0]
        next(iter(video.loader))
        video.close()
        assert seen and set(seen) == {FULL_FP32} and _precision() == outside
    finally:
        handle.remove()
