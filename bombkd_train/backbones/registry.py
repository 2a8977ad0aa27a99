"""The backbone registry: named entry points, ``create_backbone`` and ``list_backbones``.

The built-in names are two tables: ``PRETRAINED`` (hub id, default clip, normalisation) and
``TINY`` (a small random config of the same architectures, for tests and the demo);
``register_backbone`` adds any other entry point. ``create_backbone`` also accepts any Hugging Face hub id
(``org/name``) or a directory written by ``save_pretrained``; the architecture then comes from
``config.model_type``.
"""
from __future__ import annotations

from typing import Callable

from bombkd_io.errors import ConfigError, needs_extra
import bombkd_train.backbones.hf as hf
from bombkd_train.backbones.hf import Backbone

EntryPoint = Callable[..., Backbone]  # (*, frames, size, pool, device, revision) -> Backbone
_ENTRY_POINTS: dict[str, EntryPoint] = {}


def register_backbone(name: str) -> Callable[[EntryPoint], EntryPoint]:
    """Decorator: make ``fn(*, frames, size, pool, device, revision) -> Backbone`` available as
    ``name``."""
    def add(fn: EntryPoint) -> EntryPoint:
        if name in _ENTRY_POINTS:
            raise ValueError(f"backbone {name!r} is already registered")
        _ENTRY_POINTS[name] = fn
        return fn
    return add


def list_backbones() -> list[str]:
    """Registered names, sorted (hub ids and local directories are accepted too)."""
    return sorted(_ENTRY_POINTS)


def check_backbone_name(name: str) -> str | None:
    """None when ``create_backbone`` can resolve ``name``; otherwise what is wrong with it."""
    if name in _ENTRY_POINTS or hf.is_pretrained_source(name):
        return None
    return (f"unknown backbone {name!r}: expected one of {list_backbones()}, a Hugging Face hub "
            "id (org/name) or a directory written by save_pretrained (with a config.json)")


def create_backbone(name: str, *, frames: int | None = None, size: int | None = None,
                    pool: str = "time", device: str = "cpu",
                    revision: str | None = None) -> Backbone:
    """A frozen backbone by registered name, hub id or local directory.

    ``revision``: the hub branch, tag or commit to load (None: the default branch); the tiny
    built-ins have none and refuse one.
    ``frames``/``size`` override the clip the model consumes (None: the model's own); models
    with learned position tables refuse an override with a ConfigError. ``pool``: "time" ->
    ``[B, T', D]``, "mean" -> ``[B, 1, D]``, "none" -> all patch tokens ``[B, T'*P, D]``.
    """
    if pool not in hf.POOLS:
        raise ConfigError(f"pool={pool!r}: expected one of {list(hf.POOLS)}")
    problem = check_backbone_name(name)
    if problem:
        raise ConfigError(problem)
    with needs_extra("video"):  # every backbone, the tiny ones too, imports transformers
        if name in _ENTRY_POINTS:
            return _ENTRY_POINTS[name](frames=frames, size=size, pool=pool, device=device,
                                       revision=revision)
        return hf.load_pretrained(name, revision=revision, frames=frames, size=size, pool=pool,
                                  device=device)


# --- pretrained models (downloaded from the Hugging Face hub on first use) ---
# name -> hub id, default clip (frames, size), normalisation (mean, std). V-JEPA 2 was pretrained
# on 64-frame clips; its rotary positions take 16-frame clips as well.
PRETRAINED = {
    "vjepa2": ("facebook/vjepa2-vitl-fpc64-256", 16, 256, hf.IMAGENET_MEAN, hf.IMAGENET_STD),
    "videomae": ("MCG-NJU/videomae-base", 16, 224, hf.IMAGENET_MEAN, hf.IMAGENET_STD),
    "timesformer": ("facebook/timesformer-base-finetuned-k400", 8, 224, hf.KINETICS_MEAN,
                    hf.KINETICS_STD),
    "vivit": ("google/vivit-b-16x2-kinetics400", 32, 224, hf.HALF_MEAN, hf.HALF_STD),
}


def _pretrained(name: str, hub_id: str, clip_frames: int, clip_size: int, mean,
                std) -> EntryPoint:
    """The entry point of one ``PRETRAINED`` model."""
    def entry(*, frames=None, size=None, pool="time", device="cpu", revision=None) -> Backbone:
        return hf.load_pretrained(hub_id, name=name, revision=revision,
                                  frames=frames or clip_frames, size=size or clip_size,
                                  mean=mean, std=std, pool=pool, device=device)
    return entry


for _name, _spec in PRETRAINED.items():
    register_backbone(_name)(_pretrained(_name, *_spec))


# --- tiny built-ins: same architectures, small configs, fixed random weights, no download ---
# Widths and token counts differ on purpose (D 96/64/128/80, T' 8/8/16/8) so that converters
# and fusion are exercised on teachers that do not look like the student.

TINY = {  # name -> transformers config class, its settings
    "tiny-vjepa2": ("VJEPA2Config", dict(
        crop_size=112, frames_per_clip=16, tubelet_size=2, patch_size=16, hidden_size=96,
        num_attention_heads=4, num_hidden_layers=2, mlp_ratio=2.0, pred_hidden_size=32,
        pred_num_attention_heads=2, pred_num_hidden_layers=1, num_pooler_layers=1)),
    "tiny-videomae": ("VideoMAEConfig", dict(
        image_size=112, num_frames=16, tubelet_size=2, patch_size=16, hidden_size=64,
        num_attention_heads=2, num_hidden_layers=2, intermediate_size=128,
        decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=64)),
    "tiny-timesformer": ("TimesformerConfig", dict(
        image_size=64, num_frames=16, patch_size=16, hidden_size=128, num_attention_heads=4,
        num_hidden_layers=2, intermediate_size=256)),
    "tiny-vivit": ("VivitConfig", dict(
        image_size=64, num_frames=16, tubelet_size=[2, 16, 16], hidden_size=80,
        num_attention_heads=4, num_hidden_layers=2, intermediate_size=160)),
}


def _tiny(name: str, config_class: str, settings: dict) -> EntryPoint:
    """The entry point of one ``TINY`` model: fixed random weights of that config."""
    def entry(*, frames=None, size=None, pool="time", device="cpu", revision=None) -> Backbone:
        import transformers
        config = getattr(transformers, config_class)(**settings)
        return hf.build_random(name, config, revision=revision, frames=frames, size=size,
                               pool=pool, device=device)
    return entry


for _name, _spec in TINY.items():
    register_backbone(_name)(_tiny(_name, *_spec))
