"""Names a package exports without importing their modules until first use (PEP 562).

``bombkd_io`` and ``bombkd_io.video`` list their public names here, module by module, so that
importing either loads neither DALI, PyAV nor transformers: cached mode runs without them.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any


def lazy_exports(package: str, modules: Mapping[str, tuple[str, ...]]
                 ) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``(__all__, __getattr__, __dir__)`` for ``package``: each name of ``modules[m]`` is
    imported from ``package.m`` on first use, then kept in the package like a plain import."""
    home = {name: module for module, names in modules.items() for name in names}
    if len(home) != sum(len(names) for names in modules.values()):
        raise ValueError(f"{package}: a name is listed under two modules: {dict(modules)}")

    def __getattr__(name: str) -> Any:
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f"{package}.{home[name]}"), name)
        setattr(sys.modules[package], name, value)  # the next lookup finds it without this
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(home))

    return sorted(home), __getattr__, __dir__
