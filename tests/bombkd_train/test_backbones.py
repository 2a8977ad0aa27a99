"""Backbones, parametrised over the registry's tiny built-ins (the pretrained ones download)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bombkd_io.errors import ConfigError
from bombkd_io.sampling import sample_indices
from bombkd_io.video.resize import resize_crop_tensor
from bombkd_train.backbones import (POOLS, Backbone, check_backbone_name, create_backbone,
                                    list_backbones, register_backbone)
from bombkd_train.backbones.hf import ARCHS, state_digest
from places import REPO, child_env

TINY = [name for name in list_backbones() if name.startswith("tiny-")]
# name -> (dim, tokens, frames, size): distinct widths and lengths, so converters must adapt.
EXPECTED = {"tiny-vjepa2": (96, 8, 16, 112), "tiny-videomae": (64, 8, 16, 112),
            "tiny-timesformer": (128, 16, 16, 64), "tiny-vivit": (80, 8, 16, 64)}


def clips(batch: int, frames: int, size: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (batch, frames, size, size, 3), dtype=np.uint8))


def weights_digest(backbone: Backbone) -> str:
    return state_digest(backbone.model)


@pytest.fixture(scope="module")
def built() -> dict[str, Backbone]:
    return {name: create_backbone(name) for name in TINY}


def test_registry_lists_pretrained_and_tiny_models():
    names = list_backbones()
    assert {"vjepa2", "videomae", "timesformer", "vivit"} <= set(names)
    assert sorted(TINY) == sorted(EXPECTED)
    assert names == sorted(names)


def test_register_refuses_a_duplicate_name():
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("tiny-vjepa2")(lambda **_: None)


@pytest.mark.parametrize("name", TINY)
def test_attributes_and_output_shape(built, name):
    bb = built[name]
    dim, tokens, frames, size = EXPECTED[name]
    assert (bb.dim, bb.tokens, bb.frames, bb.size, bb.pool) == (dim, tokens, frames, size, "time")
    out = bb(clips(3, frames, size))
    assert out.shape == (3, tokens, dim) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.std() > 0


@pytest.mark.parametrize("name", TINY)
def test_frozen(built, name):
    bb = built[name]
    assert not bb.training and not any(p.requires_grad for p in bb.parameters())
    parent = torch.nn.Sequential(bb)
    parent.train()  # a trainer's .train() must not switch dropout back on
    assert not bb.training and not bb.model.training
    out = bb(clips(2, bb.frames, bb.size))
    assert not out.requires_grad
    # not an inference tensor: a trained head can take it as input and backpropagate
    head = torch.nn.Linear(bb.dim, 2)
    head(out).sum().backward()
    assert head.weight.grad is not None


@pytest.mark.parametrize("name", TINY)
def test_deterministic_weights_and_outputs(built, name):
    again = create_backbone(name)
    assert weights_digest(again) == weights_digest(built[name])
    x = clips(2, again.frames, again.size, seed=1)
    assert torch.equal(again(x), built[name](x))
    torch.manual_seed(123)  # construction neither reads nor moves the caller's RNG
    state = torch.get_rng_state()
    create_backbone(name)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.slow
def test_weights_identical_in_another_process(built):
    code = ("import json; from tests.bombkd_train.test_backbones import TINY, weights_digest;"
            "from bombkd_train.backbones import create_backbone;"
            "print(json.dumps({n: weights_digest(create_backbone(n)) for n in TINY}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(REPO), env=child_env())
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        n: weights_digest(built[n]) for n in TINY}


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("pool", POOLS)
def test_pooling_reads_one_patch_grid(built, name, pool):
    """time = the grid averaged over patches; mean = over everything; none = the grid itself."""
    bb = create_backbone(name, pool=pool)
    x = clips(2, bb.frames, bb.size, seed=2)
    timed = built[name](x)                                    # [B, T', D]
    out = bb(x)
    steps = built[name].tokens
    assert out.shape == (2, bb.tokens, bb.dim)
    if pool == "mean":
        torch.testing.assert_close(out, timed.mean(dim=1, keepdim=True))
    elif pool == "none":
        assert bb.tokens == steps * (bb.size // 16) ** 2
        torch.testing.assert_close(out.reshape(2, steps, -1, bb.dim).mean(dim=2), timed)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_token_layout(arch):
    """Grid [B, T', P, D] from each encoder's token order (TimeSformer is patch-major + CLS)."""
    spec, steps, patches = ARCHS[arch], 4, 3
    t = torch.arange(steps).view(1, steps, 1).expand(1, steps, patches)
    p = torch.arange(patches).view(1, 1, patches).expand(1, steps, patches)
    tokens = torch.stack([t, p], dim=-1).float()              # [1, T', P, 2] = (t, p)
    if spec.patch_major:
        tokens = tokens.transpose(1, 2)                       # [1, P, T', 2]
    hidden = tokens.reshape(1, steps * patches, 2)
    if spec.cls_token:
        hidden = torch.cat([torch.full((1, 1, 2), -1.0), hidden], dim=1)
    grid = spec.grid(hidden, steps)
    assert torch.equal(grid[..., 0], t.float()) and torch.equal(grid[..., 1], p.float())


def test_resamples_frames_and_resizes_on_device(built):
    bb = built["tiny-vjepa2"]
    long = clips(2, 40, bb.size, seed=3)
    picked = long[:, torch.from_numpy(sample_indices(40, bb.frames))]
    torch.testing.assert_close(bb(long), bb(picked), rtol=0, atol=0)
    assert bb(clips(2, 8, 150)).shape == (2, bb.tokens, bb.dim)  # repeat frames, shrink + crop


def test_frame_and_size_overrides():
    bb = create_backbone("tiny-vjepa2", frames=8, size=64)
    assert (bb.frames, bb.size, bb.tokens) == (8, 64, 4)
    assert bb(clips(1, 8, 64)).shape == (1, 4, 96)
    with pytest.raises(ConfigError, match="learned position embeddings"):
        create_backbone("tiny-vivit", frames=8)
    with pytest.raises(ConfigError, match="multiple of 2"):
        create_backbone("tiny-videomae", frames=7)


def test_bad_names_and_inputs(built):
    with pytest.raises(ConfigError, match="unknown backbone 'nope'.*tiny-vjepa2"):
        create_backbone("nope")
    with pytest.raises(ConfigError, match="pool='max'"):
        create_backbone("tiny-vjepa2", pool="max")
    assert check_backbone_name("MCG-NJU/videomae-base") is None  # hub ids resolve lazily
    with pytest.raises(ValueError, match=r"uint8 clips \[B, T, H, W, 3\]"):
        built["tiny-vjepa2"](clips(1, 16, 112).float())


@pytest.mark.parametrize("name", TINY)
def test_save_pretrained_directory_loads_like_a_hub_id(built, name, tmp_path):
    """A save_pretrained directory goes through the hub-id path (AutoConfig -> model_type)."""
    built[name].model.save_pretrained(tmp_path / name)
    loaded = create_backbone(str(tmp_path / name))
    assert (loaded.arch, loaded.dim, loaded.tokens, loaded.frames, loaded.size) == (
        built[name].arch, *EXPECTED[name])
    x = clips(2, loaded.frames, loaded.size, seed=4)
    torch.testing.assert_close(loaded(x), built[name](x), rtol=0, atol=0)


def test_directory_of_an_unsupported_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="model_type 'bert' is not a supported video backbone"):
        create_backbone(str(tmp_path))


def test_directory_without_weights_is_a_clear_error(built, tmp_path):
    built["tiny-vivit"].model.config.save_pretrained(tmp_path)  # config.json, no weights
    with pytest.raises(ConfigError, match=f"backbone '{tmp_path}' cannot be loaded"):
        create_backbone(str(tmp_path))


def test_device_resize_is_the_decoders_resize(built):
    """A 160x120 clip resized in the backbone cuts DALI's window (offset 19 of 149, not 18)."""
    bb = built["tiny-vjepa2"]                                   # size 112
    ramp = torch.arange(160, dtype=torch.uint8).expand(1, bb.frames, 120, 160)
    clip = ramp.unsqueeze(-1).expand(-1, -1, -1, -1, 3).contiguous()   # [1, T, 120, 160, 3]
    x = clip[0].permute(0, 3, 1, 2).float() / 255.0              # [T, 3, 120, 160]
    expected = (resize_crop_tensor(x, bb.size).unsqueeze(0) - bb.mean) / bb.std
    got = bb.preprocess(clip)                                   # [1, T, 3, 112, 112]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    floor = F.interpolate(x, size=(112, 149), mode="bilinear", antialias=True)[..., 18:130]
    assert not torch.allclose(got, (floor.unsqueeze(0) - bb.mean) / bb.std, atol=1e-3)


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"
FROM_HUB = """
import json, sys
from bombkd_train.backbones import create_backbone
for revision in (None, "main", sys.argv[1]):
    bb = create_backbone("bombkd-test/tiny-vjepa2", revision=revision)
    print(json.dumps([revision, bb.source, bb.weights]))
"""


def test_a_hub_model_is_traced_to_its_commit(tmp_path):
    """A hub id loads from the local hub cache (offline; no network here) and records the commit
    its files resolved to, for the default branch, a branch name and the commit itself."""
    repo = tmp_path / "hub" / "models--bombkd-test--tiny-vjepa2"
    create_backbone("tiny-vjepa2").model.save_pretrained(repo / "snapshots" / HUB_COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    env = {**child_env(), "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", FROM_HUB, HUB_COMMIT], capture_output=True,
                         text=True, env=env, cwd=str(REPO), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("[")]
    assert rows == [[rev, "bombkd-test/tiny-vjepa2", f"commit:{HUB_COMMIT}"]
                    for rev in (None, "main", HUB_COMMIT)]
