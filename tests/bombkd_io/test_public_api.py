"""The names ``bombkd_io`` exports: importing it stays light, and each one is documented and typed.

``import bombkd_io`` imports none of its modules; a name imports its module on first use. A child
process that cannot import DALI, PyAV, transformers, Pillow or matplotlib (``places.NO_EXTRAS``)
gets every cached-mode name and a batch from ``bombkd_io.make_cached_loader``, and the video
names that need an extra fail with the error naming it.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys

import pytest

import bombkd_io
from bombkd_io.errors import MissingExtraError
from places import NO_EXTRAS, child_env

# the names whose modules import PyAV or DALI when they load
VIDEO_NAMES = {"ClipBatch", "ClipLoader", "decode_clip", "VideoInfo", "probe_video", "probe_videos"}

CHILD = NO_EXTRAS + r'''
import json, tempfile
from pathlib import Path

import bombkd_io
results = {"after_import": sorted(m for m in sys.modules if m.startswith("bombkd"))}
failed = {}
for name in bombkd_io.__all__:
    try:
        getattr(bombkd_io, name)
    except ImportError as exc:
        failed[name] = [type(exc).__name__, str(exc)]
results["failed"] = failed

from synthetic_cache import make_feature_cache
root = make_feature_cache(Path(tempfile.mkdtemp()) / "cache", dtype="float16")
loader = bombkd_io.make_cached_loader(root, "train", batch_size=8, num_workers=0)
loader.set_epoch(0)
batch = next(iter(loader))
results["batch"] = {k: [type(v).__name__, str(getattr(v, "dtype", "")), list(getattr(v, "shape", []))]
                    for k, v in batch.items()}
results["imported"] = sorted({m.split(".")[0] for m in sys.modules} & BLOCKED)
print(json.dumps(results))
'''


@pytest.fixture(scope="module")
def child() -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD], env=child_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_import_loads_no_module_of_the_package(child):
    assert child["after_import"] == ["bombkd_io", "bombkd_io.lazy"]


def test_cached_mode_names_load_without_the_extras(child):
    assert child["imported"] == []
    assert set(child["failed"]) == VIDEO_NAMES
    assert child["batch"] == {"student": ["Tensor", "torch.float16", [8, 4, 16]],
                              "label": ["Tensor", "torch.int64", [8]],
                              "key": ["list", "", [], ], "index": ["Tensor", "torch.int64", [8]]}


def test_video_names_without_the_extra_name_it(child):
    for name, (kind, message) in child["failed"].items():
        assert kind == MissingExtraError.__name__, (name, message)
        assert "pip install 'bombkd[" in message, (name, message)


def test_the_names_are_the_objects_of_their_modules():
    from bombkd_io.loaders.cached import make_cached_loader
    from bombkd_io.video import decode_clip
    assert bombkd_io.make_cached_loader is make_cached_loader
    assert bombkd_io.decode_clip is decode_clip
    assert set(bombkd_io.__all__) <= set(dir(bombkd_io))
    with pytest.raises(AttributeError, match="module 'bombkd_io' has no attribute 'no_such_name'"):
        bombkd_io.no_such_name  # noqa: B018


def _own_doc(obj) -> str:
    """The object's docstring; not the one dataclasses makes up from the fields."""
    doc = (obj.__doc__ or "").strip()
    if dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):
        return ""
    return doc


def _hint_problems(fn, where: str) -> list[str]:
    sig = inspect.signature(fn)
    problems = [f"{where}: parameter {p.name!r} has no type hint" for p in sig.parameters.values()
                if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty]
    if fn.__name__ != "__init__" and sig.return_annotation is inspect.Signature.empty:
        problems.append(f"{where}: no return type")
    return problems


def _api_problems(name: str, obj) -> list[str]:
    """What ``obj`` lacks: a docstring and type hints, and for a class the same for each public
    method and property it defines (``__init__``: hints only, the class docstring covers it)."""
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        return []               # a constant such as DATASETS
    problems = [] if _own_doc(obj) else [f"{name}: no docstring"]
    if inspect.isfunction(obj):
        return problems + _hint_problems(obj, name)
    for attr, value in vars(obj).items():
        value = value.fget if isinstance(value, property) else value
        if (attr.startswith("_") and attr != "__init__") or not inspect.isfunction(value):
            continue
        problems += _hint_problems(value, f"{name}.{attr}")
        if attr != "__init__" and not _own_doc(value):
            problems.append(f"{name}.{attr}: no docstring")
    return problems


def test_every_exported_name_has_a_docstring_and_type_hints():
    pytest.importorskip("av", reason="the video names need the video extra to be inspected")
    pytest.importorskip("nvidia.dali", reason="the clip names need the dali extra to be inspected")
    problems = [p for name in bombkd_io.__all__ for p in _api_problems(name, getattr(bombkd_io, name))]
    assert problems == []


def test_the_check_finds_what_is_missing():
    @dataclasses.dataclass
    class Bare:
        x: int

        def method(self, y):
            return y

    def untyped(a, b: int):
        """Documented."""

    assert _api_problems("Bare", Bare) == ["Bare: no docstring", "Bare.method: parameter 'y' has "
                                           "no type hint", "Bare.method: no return type",
                                           "Bare.method: no docstring"]
    assert _api_problems("untyped", untyped) == ["untyped: parameter 'a' has no type hint",
                                                 "untyped: no return type"]
