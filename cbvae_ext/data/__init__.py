"""Dataset builder and loader: Neurosynth/NeuroStore coordinates -> MA maps + metadata -> MONAI datasets.

Build: ``python -m cbvae_ext.data build --neurosynth-dir DIR --out OUT`` or ``build_dataset(...)``.
Load: ``load_dataset_info(OUT)`` (checks the files against the manifest's checksums first; readers of the raw
files call ``check_dataset_files(OUT)``), ``make_dataset(OUT, split)``, ``load_split_tensors(OUT, split, device)``.

The names below are imported on first use (PEP 562): the builder's command line, which finds a cached build
in a second, then never imports torch and MONAI (about 9 s on 2 cores), which only the loader needs.
"""

from __future__ import annotations

import importlib
from typing import Any

#: each public name and the submodule that defines it
_SOURCES = {
    "CATEGORIES": "categories",
    "DataError": "errors",
    "DatasetInfo": "dataset",
    "LoadMapd": "dataset",
    "build_dataset": "builder",
    "check_dataset_files": "folder",
    "load_dataset_info": "dataset",
    "load_split_tensors": "dataset",
    "make_dataset": "dataset",
    "map_transforms": "dataset",
    "normalise_maps": "dataset",
}

__all__ = sorted(_SOURCES)


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_SOURCES[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
