"""Names that become parts of paths: the one grammar, and the one place a shard's location is
built from the root the user typed.

A cache, a progress file or a TC-BombKD index may come from a stranger, and a name read from it
must never become a command (``pipe:...``), a URL or a path outside the folder. So every name
that ends up in a file name - dataset, split, model (role) - matches ``NAME_RE`` (letters,
digits, ``_`` and ``-``; no dots, slashes or colons; at most 64 characters) whether it came from
a file or an argument; sample keys match ``KEY_RE`` (the same characters); ``sanitize`` is the
one way free text (a video's file name, a hub id) is made into such characters. A shard's file
name is exactly ``shard_name(dataset, split, model, k)``; ``locate(root, name)`` joins such a
checked name to the root the user typed, and only that root may carry a URL scheme.
"""
from __future__ import annotations

import re
from pathlib import Path

from bombkd_io.errors import ConfigError, FormatError

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")   # dataset, split, model (role)
KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")          # sample keys (tar member names bound them)
RESERVED_MODELS = ("cls", "json")                 # member suffixes of the student set
MANIFEST_SUFFIX = ".index.json"
# what locate() accepts: a shard name, or a manifest name (dataset-split.index.json)
_FILE_RE = re.compile(r"^(?:[A-Za-z0-9_-]{1,200}-\d{6,}\.tar|[A-Za-z0-9_-]{1,130}\.index\.json)$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # two letters at least: "C:" is a drive


def name_problem(value, what: str) -> str | None:
    """Why ``value`` is not a valid ``what`` name, or ``None`` when it is."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        return (f"{what} {value!r} is not a valid name (1-64 letters, digits, '_' or '-'; "
                "no dots, slashes or colons)")
    if what == "model" and value in RESERVED_MODELS:
        return f"model {value!r} is reserved (one of {RESERVED_MODELS})"
    return None


def name_problems(*named: tuple[object, str]) -> list[str]:
    """``name_problem`` of each ``(value, what)`` pair that has one."""
    return [p for value, what in named if (p := name_problem(value, what))]


def check_name(value, what: str, *, where=None) -> str:
    """``value`` if it is a valid ``what`` name (dataset, split, model). Else, for a name read
    from a file, ``FormatError`` naming the file (``where``); for an argument, ``ConfigError``
    naming the argument (``--{what}``)."""
    problem = name_problem(value, what)
    if problem is None:
        return value
    if where is not None:
        raise FormatError(f"{where}: {problem}; the file was not written by bombkd or was "
                          "changed since; refusing to use it")
    raise ConfigError(f"--{what}: {problem}")


def sanitize(text: str, fallback: str) -> str:
    """``text`` in name characters: each run of others becomes ``_``, and ``_`` at either end is
    dropped; ``fallback`` when nothing is left. The length is checked where the result is used
    (``name_problem``, the writer's key check)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or fallback


def role_name(teacher: str) -> str:
    """A teacher's role, its name in shard files and manifests: ``teacher`` itself when it is a
    valid model name, else the last part of its hub id or directory, sanitised."""
    if name_problem(teacher, "model") is None:
        return teacher
    return sanitize(Path(teacher.rstrip("/")).name, "teacher")


def shard_name(dataset: str, split: str, model: str, k: int) -> str:
    """``{dataset}-{split}-{model}-{k:06d}.tar``: the only name a shard may have."""
    return f"{dataset}-{split}-{model}-{k:06d}.tar"


def manifest_name(dataset: str, split: str) -> str:
    return f"{dataset}-{split}{MANIFEST_SUFFIX}"


def is_url(root) -> bool:
    """Whether the root the user typed is a URL (``s3://...``, ``pipe:...``) rather than a path."""
    return isinstance(root, str) and bool(_SCHEME.match(root))


def locate(root, name: str) -> str | Path:
    """Where shard (or manifest) ``name`` of a cache at ``root`` is: a ``Path`` under a local
    root, ``{root}/{name}`` under a URL root. ``name`` must be a plain shard or manifest name,
    so nothing read from a file can add a scheme, a ``..`` or an absolute path."""
    if not isinstance(name, str) or not _FILE_RE.fullmatch(name):
        raise FormatError(f"{name!r} is not a shard or manifest name of a bombkd cache")
    if is_url(root):
        return f"{root.rstrip('/')}/{name}"
    return Path(root) / name
