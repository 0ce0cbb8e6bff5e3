"""Loading a dataset folder: metadata + memory-mapped maps as MONAI datasets or device-resident tensors.

Each item is ``{"image": float32 [1, D, H, W] in [0, 1], "meta": [schema.meta_dim], "meta_mask":
[schema.mask_dim], "year_bin": int, "category": int, "id": str}``. ``image`` is the stored MA map
divided by its own maximum (every kept study has an in-mask peak, so the maximum is positive).
Maps are read from ``maps.npy`` through ``np.load(mmap_mode="r")``, opened lazily once per process, so
DataLoader workers share the page cache instead of copying the array.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from monai.config import KeysCollection
from monai.data import CacheDataset, Dataset
from monai.transforms import Compose, EnsureTyped, Lambdad, MapTransform

from cbvae_ext.schema import CONTINUOUS_FIELDS, MetadataSchema

from .builder import vector_columns
from .errors import DataError
from .folder import DATASET_FILES, check_dataset_files, rebuild_fix

__all__ = [
    "SPLITS",
    "DatasetInfo",
    "LoadMapd",
    "load_dataset_info",
    "load_split_tensors",
    "make_dataset",
    "map_transforms",
    "normalise_maps",
]

SPLITS = ("train", "val", "test", "all")


def normalise_maps(maps: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Divide each map of a batch by its own maximum: ``[B, ...]`` -> float32 tensor of the same shape in [0, 1].

    The one definition of the model's input scaling (MA maps are >= 0 and 0 outside the mask, so this is
    min-max scaling); an all-zero map stays zero. Already-scaled maps come back unchanged.
    """
    x = maps.float() if torch.is_tensor(maps) else torch.from_numpy(np.asarray(maps, dtype=np.float32))
    peak = x.flatten(1).amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) if x.numel() else x.new_ones(len(x))
    return x / peak.view(-1, *([1] * (x.ndim - 1)))


def _normalise_one(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    return normalise_maps(image[None])[0]


@dataclass
class DatasetInfo:
    """Everything in a dataset folder.

    Attributes:
        path: the folder.
        manifest: ``manifest.json`` content.
        schema: the metadata vector declaration (fitted on the training split).
        metadata: ``metadata.parquet``; row ``i`` describes ``maps[i]``.
        maps: read-only memory map ``[N, D, H, W]``.
        mask: bool brain mask ``[D, H, W]``.
        affine: 4x4 voxel-to-MNI affine.
    """

    path: Path
    manifest: dict
    schema: MetadataSchema
    metadata: pd.DataFrame
    maps: np.ndarray
    mask: np.ndarray
    affine: np.ndarray

    def rows(self, split: str) -> np.ndarray:
        """Row indices of a split (``"all"`` for every row)."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        if split == "all":
            return np.arange(len(self.metadata))
        return np.flatnonzero(self.metadata["split"].to_numpy() == split)

    def encode(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(meta, meta_mask)`` of the given rows via ``schema.encode``."""
        frame = self.metadata.iloc[rows]
        values: dict[str, Any] = {f: frame[f].to_numpy(np.float64) for f in CONTINUOUS_FIELDS}
        for name, size in self.schema.vector_sizes.items():
            vec = frame[vector_columns(name, size)].to_numpy(np.float64, copy=True)
            vec[~frame[f"{name}_observed"].to_numpy(bool)] = np.nan
            values[name] = vec
        return self.schema.encode(values, frame["category"].tolist())

    def category_index(self, rows: np.ndarray) -> np.ndarray:
        return np.array([self.schema.category_index(c) for c in self.metadata["category"].iloc[rows]], dtype=np.int64)


def load_dataset_info(path: str | Path, full_check: bool = False) -> DatasetInfo:
    """Open a dataset folder written by ``build_dataset``, after checking its files against the manifest.

    Args:
        path: the dataset folder.
        full_check: hash ``maps.npy`` whole (seconds for a full build) instead of its size and sampled hash.

    Raises:
        DataError: when the folder is missing, incomplete, of another format version, edited after its
            build, or inconsistent.
    """
    path = Path(path)
    fix = "build it with: python -m cbvae_ext.data build --out " + str(path)
    if not path.is_dir():
        raise DataError(f"dataset folder {path} does not exist; {fix}")
    missing = [f for f in DATASET_FILES if not (path / f).is_file()]
    if missing:
        raise DataError(f"dataset folder {path} is incomplete (missing {', '.join(missing)}); {rebuild_fix(path)}")
    manifest = check_dataset_files(path, full_check)
    try:
        schema = MetadataSchema.from_dict(manifest["schema"])
        metadata = pd.read_parquet(path / "metadata.parquet")
        maps = np.load(path / "maps.npy", mmap_mode="r")
        mask_img = nib.load(path / "mask.nii.gz")
        mask = np.asarray(mask_img.dataobj) > 0
        affine = np.asarray(mask_img.affine, dtype=np.float64)
    except Exception as err:  # numpy, pyarrow, nibabel and gzip each raise their own types for a bad file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"dataset folder {path} is unreadable ({reason}); {rebuild_fix(path)}") from err
    _check_columns(path, metadata, schema)
    if maps.ndim != 4 or maps.shape[0] != len(metadata) or maps.shape[1:] != mask.shape:
        raise DataError(
            f"dataset folder {path} is inconsistent: maps {maps.shape}, {len(metadata)} metadata rows, mask "
            f"{mask.shape}; {rebuild_fix(path)}"
        )
    return DatasetInfo(path, manifest, schema, metadata, maps, mask, affine)


def _check_columns(path: Path, metadata: pd.DataFrame, schema: MetadataSchema) -> None:
    """The columns the loader reads exist, with usable types."""
    vectors = schema.vector_sizes
    numeric = [*CONTINUOUS_FIELDS, *(c for n, k in vectors.items() for c in vector_columns(n, k)), "year_bin"]
    flags = [*(f"{f}_observed" for f in CONTINUOUS_FIELDS), "category_observed", *(f"{n}_observed" for n in vectors)]
    missing = [c for c in ["id", "split", "category", *numeric, *flags] if c not in metadata]
    if missing:
        raise DataError(f"{path / 'metadata.parquet'} lacks column(s) {', '.join(missing[:3])}; {rebuild_fix(path)}")
    wrong = [c for c in numeric if not pd.api.types.is_numeric_dtype(metadata[c])]
    wrong += [c for c in flags if not pd.api.types.is_bool_dtype(metadata[c])]
    if wrong:
        raise DataError(
            f"{path / 'metadata.parquet'} has column(s) {', '.join(wrong[:3])} of the wrong type; {rebuild_fix(path)}"
        )
    for column, known in (("split", SPLITS[:3]), ("category", schema.categories)):
        unknown = sorted(set(metadata[column].dropna().astype(str)) - set(known))
        if unknown:
            raise DataError(
                f"{path / 'metadata.parquet'} has unknown {column} value(s) {unknown[:3]}; {rebuild_fix(path)}"
            )


class LoadMapd(MapTransform):
    """Read map ``d["index"]`` of a ``maps.npy`` into ``d[key]`` as float32 ``[1, D, H, W]``.

    The memory map is opened on first use in each process and never pickled, so DataLoader workers
    share the file's page cache.

    Args:
        keys: output key(s), normally ``"image"``.
        maps_path: path of ``maps.npy``.
        index_key: key holding the row index.
    """

    def __init__(self, keys: KeysCollection, maps_path: str | Path, index_key: str = "index") -> None:
        super().__init__(keys)
        self.maps_path = str(maps_path)
        self.index_key = index_key
        self._maps: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        if self._maps is None:
            self._maps = np.load(self.maps_path, mmap_mode="r")
        d = dict(data)
        for key in self.keys:
            d[key] = np.asarray(self._maps[int(d[self.index_key])], dtype=np.float32)[None]
        return d


def map_transforms(maps_path: str | Path) -> Compose:
    """Load the map, divide it by its maximum (maps are 0 outside the mask, so min-max = max scaling)."""
    return Compose(
        [
            LoadMapd("image", maps_path),
            Lambdad("image", _normalise_one),
            EnsureTyped(["image", "meta", "meta_mask"], data_type="tensor", dtype=torch.float32, track_meta=False),
        ]
    )


def _items(info: DatasetInfo, rows: np.ndarray) -> list[dict]:
    meta, meta_mask = info.encode(rows)
    year_bin = info.metadata["year_bin"].to_numpy()[rows]
    category = info.category_index(rows)
    ids = info.metadata["id"].to_numpy()[rows]
    return [
        {
            "index": int(r),
            "id": str(ids[n]),
            "meta": meta[n],
            "meta_mask": meta_mask[n],
            "year_bin": int(year_bin[n]),
            "category": int(category[n]),
        }
        for n, r in enumerate(rows)
    ]


def make_dataset(path: str | Path, split: str = "train", cache: bool = False, **cache_kwargs: Any) -> Dataset:
    """A MONAI ``Dataset`` (or ``CacheDataset`` with ``cache=True``) over one split of a dataset folder.

    Args:
        path: dataset folder.
        split: ``train``, ``val``, ``test`` or ``all``.
        cache: cache the transformed items in memory (``monai.data.CacheDataset``).
        cache_kwargs: passed to ``CacheDataset`` (e.g. ``num_workers``, ``cache_rate``).
    """
    info = load_dataset_info(path)
    data = _items(info, info.rows(split))
    transform = map_transforms(info.path / "maps.npy")
    if cache:
        cache_kwargs.setdefault("progress", False)
        return CacheDataset(data, transform, **cache_kwargs)
    return Dataset(data, transform)


def load_split_tensors(
    path: str | Path,
    split: str = "train",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float16,
    chunk: int = 512,
) -> dict[str, Any]:
    """A whole split as stacked tensors on ``device`` (for the GPU-resident preset).

    Returns:
        ``{"image": [N, 1, D, H, W] (dtype, max-scaled), "meta": [N, M] float32, "meta_mask": [N, schema.mask_dim] float32,
        "year_bin": [N] int64, "category": [N] int64, "id": list[str]}``.
    """
    info = load_dataset_info(path)
    rows = info.rows(split)
    device = torch.device(device)
    image = torch.empty((len(rows), 1, *info.mask.shape), dtype=dtype, device=device)
    for start in range(0, len(rows), chunk):
        block = normalise_maps(info.maps[rows[start : start + chunk]])
        image[start : start + len(block), 0] = block.to(device=device, dtype=dtype)
    meta, meta_mask = info.encode(rows)
    return {
        "image": image,
        "meta": torch.from_numpy(meta).to(device),
        "meta_mask": torch.from_numpy(meta_mask).to(device),
        "year_bin": torch.from_numpy(info.metadata["year_bin"].to_numpy()[rows].astype(np.int64)).to(device),
        "category": torch.from_numpy(info.category_index(rows)).to(device),
        "id": [str(i) for i in info.metadata["id"].to_numpy()[rows]],
    }
