"""Package namespaces whose names are imported on first use (PEP 562).

A command such as ``python -m cbvae_ext.data build`` imports its package first; an eager ``__init__`` would
then load torch and MONAI (about 9 s on 2 cores) even where the command needs neither, e.g. to find a
cached build or to refuse bad input.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, names: Mapping[str, str]
) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__all__``, ``__getattr__`` and ``__dir__`` of a package that re-exports names from its submodules.

    Args:
        package: the package's ``__name__``.
        names: submodule (relative to ``package``) -> the public names it defines, space-separated (as
            ``from .sub import ...`` would list them).

    Returns:
        ``(__all__, __getattr__, __dir__)``: assign them at the package's top level.
    """
    sources = {name: module for module, defined in names.items() for name in defined.split()}

    def __getattr__(name: str) -> Any:  # noqa: N807 (the module protocol's name)
        if name not in sources:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{sources[name]}"), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:  # noqa: N807
        return sorted({*vars(sys.modules[package]), *sources})

    return sorted(sources), __getattr__, __dir__
