"""Frozen Hugging Face video transformers behind one small module, ``Backbone``.

A backbone takes the decoder's clips (uint8 ``[B, T, S, S, 3]``, channels last) and returns
float32 features ``[B, T', D]``. Everything model specific lives in one ``Arch`` row per
architecture: the transformers class, where the config keeps frame count and crop size, the
normalisation, and how the encoder lays out its tokens:

- VJEPA2, VideoMAE: no CLS; ``T' * H' * W'`` tubelet tokens, time-major (Conv3d output flattened).
- ViViT: a CLS token, then ``T' * H' * W'`` tubelet tokens, time-major.
- TimeSformer: a CLS token, then ``H' * W' * T`` per-frame patch tokens, patch-major
  (its divided space-time blocks keep the patches of one position together).

``Arch.grid`` turns either layout into one patch grid ``[B, T', P, D]`` (CLS dropped), and every
pooling is read off that grid, so pooled features mean the same thing for every model.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from bombkd_io.errors import ConfigError
from bombkd_io.sampling import sample_indices
from bombkd_io.video.resize import resize_crop_tensor

POOLS = ("time", "mean", "none")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF_MEAN, HALF_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
KINETICS_MEAN, KINETICS_STD = (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)


@dataclass(frozen=True)
class Arch:
    """What bombkd needs to know about one transformers video architecture."""

    model_type: str        # config.model_type
    model_class: str       # transformers class name
    frames_attr: str       # config attribute holding the clip length the model was built for
    size_attr: str         # config attribute holding the square crop size
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    cls_token: bool        # a CLS token precedes the patch tokens
    patch_major: bool      # TimeSformer: tokens ordered (patch, frame) instead of (frame, patch)
    flexible: bool         # no learned position table: frames and size may differ from the config
    input_name: str = "pixel_values"

    def tubelet_and_patch(self, config) -> tuple[int, int]:
        """Frames per temporal token and pixels per patch side."""
        if self.model_type == "vivit":  # tubelet_size is (t, h, w)
            return int(config.tubelet_size[0]), int(config.tubelet_size[1])
        tubelet = 1 if self.model_type == "timesformer" else int(config.tubelet_size)
        patch = config.patch_size
        return tubelet, int(patch[0] if isinstance(patch, (list, tuple)) else patch)

    def grid(self, hidden: torch.Tensor, steps: int) -> torch.Tensor:
        """Encoder tokens ``[B, N, D]`` -> patch grid ``[B, T', P, D]`` (CLS dropped)."""
        if self.cls_token:
            hidden = hidden[:, 1:]                                   # [B, T'*P, D]
        b, n, d = hidden.shape
        if self.patch_major:
            return hidden.reshape(b, n // steps, steps, d).transpose(1, 2)  # [B, T', P, D]
        return hidden.reshape(b, steps, n // steps, d)              # [B, T', P, D]

    def run(self, model, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised ``[B, T, 3, S, S]`` -> last hidden state ``[B, N, D]``."""
        if self.model_type == "vjepa2":  # the predictor is a pretraining head: skip it
            return model(pixel_values_videos=pixels, skip_predictor=True).last_hidden_state
        return model(**{self.input_name: pixels}).last_hidden_state


ARCHS = {a.model_type: a for a in (
    Arch("vjepa2", "VJEPA2Model", "frames_per_clip", "crop_size", IMAGENET_MEAN, IMAGENET_STD,
         cls_token=False, patch_major=False, flexible=True, input_name="pixel_values_videos"),
    Arch("videomae", "VideoMAEModel", "num_frames", "image_size", IMAGENET_MEAN, IMAGENET_STD,
         cls_token=False, patch_major=False, flexible=True),
    Arch("timesformer", "TimesformerModel", "num_frames", "image_size", KINETICS_MEAN,
         KINETICS_STD, cls_token=True, patch_major=True, flexible=False),
    Arch("vivit", "VivitModel", "num_frames", "image_size", HALF_MEAN, HALF_STD,
         cls_token=True, patch_major=False, flexible=False),
)}


class Backbone(torch.nn.Module):
    """A frozen video encoder: uint8 clips ``[B, T, S, S, 3]`` -> float32 ``[B, T', D]``.

    Attributes: ``name`` (what ``create_backbone`` was given), ``arch`` (config.model_type),
    ``dim`` (D), ``tokens`` (T' after pooling), ``frames`` and ``size`` (the clip the model
    consumes), ``pool`` ("time", "mean" or "none"), ``mean``/``std`` (normalisation, 0..1 scale).
    Clips of another length or size are resampled by ``sample_indices`` / resized on the device.
    Where the weights came from: ``source`` (hub id or directory; None for a random built-in),
    ``revision`` (the one asked for) and ``weights`` (``weights_identity``); ``record()``.
    """

    def __init__(self, model: torch.nn.Module, arch: Arch, *, name: str, pool: str,
                 mean: tuple[float, ...], std: tuple[float, ...], device: str | torch.device,
                 source: str | None, revision: str | None, weights: str):
        super().__init__()
        config = model.config
        self.model, self.arch_spec, self.name, self.pool = model, arch, name, pool
        self.source, self.revision, self.weights = source, revision, weights
        self.normalization = ([float(v) for v in mean], [float(v) for v in std])
        self.arch = arch.model_type
        self.frames = int(getattr(config, arch.frames_attr))
        size = getattr(config, arch.size_attr)
        self.size = int(size[0] if isinstance(size, (list, tuple)) else size)
        self.dim = int(config.hidden_size)
        self.tubelet, self.patch = arch.tubelet_and_patch(config)
        self.steps = self.frames // self.tubelet                  # T' before pooling
        self.patches = (self.size // self.patch) ** 2             # P, patch tokens per step
        self.tokens = {"time": self.steps, "mean": 1, "none": self.steps * self.patches}[pool]
        self.register_buffer("mean", torch.tensor(mean).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.to(device)
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def train(self, mode: bool = True) -> "Backbone":
        """Frozen: a parent's ``.train()`` leaves the backbone in eval mode (no dropout)."""
        return super().train(False)

    def record(self) -> dict:
        """What a cache records of this model beside its shape: weights, dtype, normalisation
        and the bombkd version (``ModelEntry``'s optional fields)."""
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        return {"source": self.source, "revision": self.revision, "weights": self.weights,
                "model_dtype": dtype, "mean": self.normalization[0],
                "std": self.normalization[1], "bombkd": bombkd_version()}

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, dim={self.dim}, tokens={self.tokens}, frames={self.frames}, "
                f"size={self.size}, pool={self.pool!r}")

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, T, H, W, 3]`` -> float32 ``[B, T', D]`` (``[B, 1, D]`` / ``[B, N, D]``)."""
        with torch.no_grad():  # not inference_mode: the features feed a trained head
            pixels = self.preprocess(clips)                        # [B, frames, 3, size, size]
            hidden = self.arch_spec.run(self.model, pixels)        # [B, N, D]
            grid = self.arch_spec.grid(hidden.float(), self.steps)  # [B, T', P, D]
            if self.pool == "time":
                return grid.mean(dim=2).contiguous()               # [B, T', D]
            if self.pool == "mean":
                return grid.mean(dim=(1, 2)).unsqueeze(1)          # [B, 1, D]
            return grid.reshape(grid.shape[0], -1, self.dim).contiguous()  # [B, T'*P, D]

    def preprocess(self, clips: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, T, H, W, 3]`` -> normalised float ``[B, frames, 3, size, size]``."""
        if clips.dtype != torch.uint8 or clips.ndim != 5 or clips.shape[-1] != 3:
            raise ValueError(f"{self.name}: expected uint8 clips [B, T, H, W, 3], got "
                             f"{clips.dtype} {list(clips.shape)}")
        clips = clips.to(self.device, non_blocking=True)
        if clips.shape[1] != self.frames:  # same rule as the decoders, so a clip is reproducible
            index = torch.from_numpy(sample_indices(clips.shape[1], self.frames)).to(self.device)
            clips = clips.index_select(1, index)                   # [B, frames, H, W, 3]
        x = clips.permute(0, 1, 4, 2, 3).float().div_(255.0)       # [B, frames, 3, H, W]
        if x.shape[-2:] != (self.size, self.size):
            x = _resize_crop(x, self.size)                         # [B, frames, 3, size, size]
        return (x - self.mean) / self.std


def _resize_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The clip contract's resize + centre crop (DALI's rounding), per frame."""
    b, t, c, h, w = x.shape
    x = resize_crop_tensor(x.reshape(b * t, c, h, w), size)      # [B*T, 3, size, size]
    return x.reshape(b, t, c, size, size)                       # [B, T, 3, size, size]


def arch_for(config, source: str) -> Arch:
    """The ``Arch`` of a transformers config, or a ConfigError naming the supported ones."""
    arch = ARCHS.get(getattr(config, "model_type", None))
    if arch is None:
        raise ConfigError(f"{source}: model_type {getattr(config, 'model_type', None)!r} is not a "
                          f"supported video backbone; expected one of {sorted(ARCHS)}")
    return arch


def _fit_config(config, arch: Arch, source: str, frames: int | None, size: int | None) -> None:
    """Apply frame/size overrides where the architecture allows them; refuse where it doesn't."""
    tubelet, patch = arch.tubelet_and_patch(config)
    for attr, value, step in ((arch.frames_attr, frames, tubelet), (arch.size_attr, size, patch)):
        if value is None or value == getattr(config, attr):
            continue
        if not arch.flexible:
            flag = "frames" if attr == arch.frames_attr else "size"
            raise ConfigError(f"{source}: {arch.model_type} has learned position embeddings for "
                              f"{attr}={getattr(config, attr)}; pass {flag}="
                              f"{getattr(config, attr)} (--{flag} {getattr(config, attr)}) instead "
                              f"of {value}")
        if value < step or value % step:
            raise ConfigError(f"{source}: {attr}={value} must be a positive multiple of {step}")
        setattr(config, attr, value)


def load_pretrained(source: str, *, name: str | None = None, revision: str | None = None,
                    frames: int | None = None, size: int | None = None,
                    mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                    pool: str = "time", device: str = "cpu") -> Backbone:
    """A hub id (``org/name``) or a ``save_pretrained`` directory -> frozen ``Backbone``.

    ``revision``: a hub branch, tag or commit (None: the default branch). The architecture
    comes from ``config.model_type``; ``mean``/``std`` default to the architecture's
    normalisation.
    """
    import transformers

    with _loading(source, revision):
        config = transformers.AutoConfig.from_pretrained(source, revision=revision)
    arch = arch_for(config, source)
    _fit_config(config, arch, source, frames, size)
    with _loading(source, revision):
        model = getattr(transformers, arch.model_class).from_pretrained(
            source, config=config, revision=revision, dtype=torch.float32)
        weights = weights_identity(source, revision, model)
    return Backbone(model, arch, name=name or source, pool=pool, mean=mean or arch.mean,
                    std=std or arch.std, device=device, source=source, revision=revision,
                    weights=weights)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack")


def weights_identity(source: str, revision: str | None, model: torch.nn.Module) -> str:
    """Which weights these are: ``commit:<hash>`` for a hub model (the commit its files were
    resolved to), ``files-sha256:<hex>`` for a directory (``files_digest``), else
    ``state-sha256:<hex>`` (``state_digest`` of the loaded model)."""
    if Path(source).is_dir():
        return "files-sha256:" + files_digest(Path(source))
    from transformers.utils import cached_file, extract_commit_hash

    commit = extract_commit_hash(cached_file(source, "config.json", revision=revision), None)
    return f"commit:{commit}" if commit else "state-sha256:" + state_digest(model)


def files_digest(folder: Path) -> str:
    """sha256 over ``config.json`` and the weight files of a ``save_pretrained`` directory, in
    name order, each as its name, a NUL byte and its bytes."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and (path.name == "config.json" or path.suffix in WEIGHT_SUFFIXES):
            digest.update(path.name.encode() + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def state_digest(model: torch.nn.Module) -> str:
    """sha256 over a model's state dict, in name order, each as its name and its bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def bombkd_version() -> str:
    """The installed bombkd's version ("unknown" when run from a source tree not installed)."""
    try:
        return importlib.metadata.version("bombkd")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@contextlib.contextmanager
def _loading(source: str, revision: str | None = None) -> Iterator[None]:
    """Hugging Face download / file errors -> a ConfigError naming the backbone and the fix."""
    try:
        yield
    except (OSError, ValueError) as exc:
        at = f" at revision {revision!r}" if revision else ""
        raise ConfigError(f"backbone {source!r}{at} cannot be loaded: {exc} (check the hub id, "
                          "the revision and the network, or pass a directory written by "
                          "save_pretrained)") from exc


def build_random(name: str, config, *, revision: str | None = None, frames: int | None = None,
                 size: int | None = None, pool: str = "time", device: str = "cpu") -> Backbone:
    """A small model with random weights drawn from a seed fixed by ``name``.

    The global RNG is forked, so construction neither depends on nor disturbs the caller's
    seed, and every process builds bit-identical weights; ``weights`` is their
    ``state_digest``. Such a model has no revisions: passing one is a ConfigError.
    """
    import transformers

    if revision is not None:
        raise ConfigError(f"revision={revision!r}: {name} is random-initialised from a fixed "
                          "seed and has no revisions; drop --revision")
    arch = arch_for(config, name)
    _fit_config(config, arch, name, frames, size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(name.encode()))
        model = getattr(transformers, arch.model_class)(config)
    return Backbone(model, arch, name=name, pool=pool, mean=arch.mean, std=arch.std,
                    device=device, source=None, revision=None,
                    weights="state-sha256:" + state_digest(model))


def is_pretrained_source(name: str) -> bool:
    """A local directory with a config.json, or something shaped like a hub id ``org/name``."""
    if Path(name).is_dir():
        return (Path(name) / "config.json").is_file()
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))
