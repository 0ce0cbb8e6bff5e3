"""Dataset builder and loader: Neurosynth/NeuroStore coordinates -> MA maps + metadata -> MONAI datasets.

Build: ``python -m cbvae_ext.data build --neurosynth-dir DIR --out OUT`` or ``build_dataset(...)``.
Load: ``load_dataset_info(OUT)`` (checks the files against the manifest's checksums first; readers of the raw
files call ``check_dataset_files(OUT)``), ``make_dataset(OUT, split)``, ``load_split_tensors(OUT, split, device)``.
The names are imported on first use (``cbvae_ext.lazy``): the builder's command never loads torch or MONAI.
"""

from __future__ import annotations

from cbvae_ext.lazy import lazy_exports

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
__getattr__, __dir__ = lazy_exports(__name__, _SOURCES)
