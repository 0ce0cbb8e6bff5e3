"""Dataset builder and loader: Neurosynth/NeuroStore coordinates -> MA maps + metadata -> MONAI datasets.

Build: ``python -m cbvae_ext.data build --neurosynth-dir DIR --out OUT`` or ``build_dataset(...)``.
Load: ``load_dataset_info(OUT)`` (checks the files against the manifest's checksums first; readers of the raw
files call ``check_dataset_files(OUT)``), ``make_dataset(OUT, split)``, ``load_split_tensors(OUT, split, device)``.
"""

from __future__ import annotations

from .builder import build_dataset
from .categories import CATEGORIES
from .dataset import (
    DatasetInfo,
    LoadMapd,
    load_dataset_info,
    load_split_tensors,
    make_dataset,
    map_transforms,
    normalise_maps,
)
from .errors import DataError
from .folder import check_dataset_files

__all__ = [
    "CATEGORIES",
    "DataError",
    "DatasetInfo",
    "LoadMapd",
    "build_dataset",
    "check_dataset_files",
    "load_dataset_info",
    "load_split_tensors",
    "make_dataset",
    "map_transforms",
    "normalise_maps",
]
