"""The small family of errors bombkd raises on bad input, and its one warning.

Each carries the offending path (video, shard, manifest) or argument and says what to do.
They subclass the builtin type a caller would expect, so ``except ValueError`` still works.
``DataWarning`` is for data that is used but looks wrong (filter it like any ``UserWarning``).
``ErrorPolicy`` is the one place that decides between stopping and skipping (``--on-error``).
``needs_extra`` turns the import of an optional dependency that is not installed into a
``MissingExtraError`` naming the ``bombkd[...]`` extra to install.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

ON_ERROR = ("raise", "skip")


class BombkdError(Exception):
    """Base class: a problem with the user's input, reported with what to do about it."""


class VideoError(BombkdError, ValueError):
    """A video that cannot be opened or decoded."""

    def __init__(self, path: str | os.PathLike, reason: str, fix: str = "re-encode or remove the file"):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason} ({fix})")


class DatasetError(BombkdError, ValueError):
    """A dataset root, split file or manifest that cannot be indexed."""


class ShardError(BombkdError, ValueError):
    """A feature shard that is missing, truncated or corrupt."""

    def __init__(self, shard: str | os.PathLike, reason: str, sample: str | None = None,
                 fix: str = "re-run `bombkd featurize --resume`, or pass --on-error skip"):
        self.shard, self.sample, self.reason = str(shard), sample, reason
        where = f"{shard} (sample {sample})" if sample else f"{shard}"
        super().__init__(f"{where}: {reason}; {fix}")


class FormatError(BombkdError, ValueError):
    """A cache manifest or member of an unknown format or version."""


class ConfigError(BombkdError, ValueError):
    """Arguments that do not fit together (reported all at once, before any work)."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class FolderBusyError(ConfigError):
    """An output folder another bombkd run is writing into (it holds the folder's lock)."""


class TrainingError(BombkdError, RuntimeError):
    """A run that cannot go on (a non-finite loss); stopped before a checkpoint is written."""


class OutputError(BombkdError, OSError):
    """An output that cannot be written (a full disk, a folder that is a file)."""


# The optional parts of bombkd (pyproject.toml's extras), for the message when one is missing:
# extra -> (what needs it, what it installs, the top-level modules it provides, how to install).
EXTRAS = {
    "video": ("video mode", "PyAV and transformers", ("av", "transformers", "PIL"),
              "pip install 'bombkd[video]'"),
    "dali": ("video mode", "NVIDIA DALI", ("nvidia",),
             "pip install 'bombkd[dali-cu12]' (CUDA 12) or 'bombkd[dali-cu13]' (CUDA 13)"),
    "plot": ("confusion.png", "matplotlib", ("matplotlib",), "pip install 'bombkd[plot]'"),
    "s3": ("a cache on s3://", "s3fs", ("s3fs", "fsspec", "aiobotocore", "botocore"),
           "pip install 'bombkd[s3]'"),
    "gcs": ("a cache on gs://", "gcsfs", ("gcsfs", "fsspec"), "pip install 'bombkd[gcs]'"),
    "azure": ("a cache on az://", "adlfs", ("adlfs", "fsspec"), "pip install 'bombkd[azure]'"),
    "http": ("a cache on http(s)://", "fsspec's HTTP engine (aiohttp)", ("fsspec", "aiohttp"),
             "pip install 'bombkd[http]'"),
    "hf": ("a cache on hf://", "huggingface_hub", ("huggingface_hub", "fsspec"),
           "pip install 'bombkd[video]' (it brings huggingface_hub)"),
}


def extra_hint(extra: str, module: str | None = None) -> str:
    """``<what needs it> needs <what> (no module <module>): pip install 'bombkd[<extra>]'``."""
    feature, what, _, install = EXTRAS[extra]
    return f"{feature} needs {what}" + (f" (no module {module!r})" if module else "") + f": {install}"


class MissingExtraError(BombkdError, ImportError):
    """An optional dependency that is not installed; the message names the extra to install."""

    def __init__(self, extra: str, module: str):
        self.extra = extra
        super().__init__(extra_hint(extra, module), name=module)


@contextlib.contextmanager
def needs_extra(extra: str) -> Iterator[None]:
    """Imports inside the block that fail because a module of ``extra`` is not installed raise
    ``MissingExtraError``; any other import failure (a broken install) keeps its own error."""
    try:
        yield
    except ModuleNotFoundError as exc:
        module = (exc.name or "").split(".")[0]
        if module not in EXTRAS[extra][2]:
            raise
        raise MissingExtraError(extra, module) from exc


class DataWarning(UserWarning):
    """Input that is used but looks wrong: a class folder with no videos, a decode with warnings."""


@dataclass
class ErrorPolicy:
    """``--on-error``: ``"raise"`` stops at the first bad shard, sample or video; ``"skip"``
    records it and goes on (like webdataset's handlers). ``handle(err, samples)`` decides;
    ``samples`` and ``problems`` say what was left out so far."""

    on_error: str = "raise"
    argument: str = "on_error"     # how the user spelled the choice, for the error message
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.on_error not in ON_ERROR:
            raise ConfigError(f"{self.argument} must be one of {ON_ERROR}, got {self.on_error!r}")

    @property
    def skips(self) -> bool:
        return self.on_error == "skip"

    def handle(self, error: BombkdError, samples: int = 1, fix: str = "") -> None:
        """Raise ``error``, or record it as ``samples`` left out (and warn, saying ``fix``)."""
        if not self.skips:
            raise error
        self.samples += samples
        line = _where(error)
        self.problems.append(f"{line} ({samples} sample(s) skipped)")
        warnings.warn(f"skipped {samples} sample(s): {line}" + (f"; {fix}" if fix else ""),
                      RuntimeWarning, stacklevel=3)

    def fresh(self) -> "ErrorPolicy":
        """The same choice with an empty record (one per epoch or worker)."""
        return ErrorPolicy(self.on_error, self.argument)


def _where(error: BaseException) -> str:
    """``path (sample key): reason`` for our errors, ``str(error)`` for any other."""
    if isinstance(error, ShardError):
        where = f"{error.shard} (sample {error.sample})" if error.sample else error.shard
        return f"{where}: {error.reason}"
    if isinstance(error, VideoError):
        return f"{error.path}: {error.reason}"
    return str(error)
