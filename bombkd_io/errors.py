"""The small family of errors bombkd raises on bad input, and its one warning.

Each carries the offending path (video, shard, manifest) or argument and says what to do.
They subclass the builtin type a caller would expect, so ``except ValueError`` still works.
``DataWarning`` is for data that is used but looks wrong (filter it like any ``UserWarning``).
"""
from __future__ import annotations


class BombkdError(Exception):
    """Base class: a problem with the user's input, reported with what to do about it."""


class VideoError(BombkdError, ValueError):
    """A video that cannot be opened or decoded."""

    def __init__(self, path, reason: str, fix: str = "re-encode or remove the file"):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason} ({fix})")


class DatasetError(BombkdError, ValueError):
    """A dataset root, split file or manifest that cannot be indexed."""


class ShardError(BombkdError, ValueError):
    """A feature shard that is missing, truncated or corrupt."""

    def __init__(self, shard, reason: str, sample: str | None = None,
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


class DataWarning(UserWarning):
    """Input that is used but looks wrong: a class folder with no videos, a decode with warnings."""
