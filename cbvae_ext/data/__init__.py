"""Dataset builder and loader: Neurosynth/NeuroStore coordinates -> MA maps + metadata -> MONAI datasets.

Build: ``python -m cbvae_ext.data build --neurosynth-dir DIR --out OUT`` or ``build_dataset(...)``.
Load: ``load_dataset_info(OUT)`` (checks the files against the manifest's checksums first; readers of the raw
files call ``check_dataset_files(OUT)``), ``make_dataset(OUT, split)``, ``load_split_tensors(OUT, split, device)``.
The names are imported on first use (``cbvae_ext.lazy``): the builder's command never loads torch or MONAI.
"""

from __future__ import annotations

from cbvae_ext.lazy import lazy_exports

#: each submodule and the public names it defines
_SOURCES = {
    "builder": "build_dataset",
    "categories": "CATEGORIES",
    "dataset": "DatasetInfo LoadMapd load_dataset_info load_split_tensors make_dataset map_transforms normalise_maps",
    "errors": "DataError",
    "folder": "check_dataset_files",
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _SOURCES)
