"""NiMARE's own kernel transformers on the same peaks and grid: the reference for tests and benchmarks."""

from __future__ import annotations

import warnings

import numpy as np

from .grid import Grid
from .kernels import KernelSpec
from .sources import SourceTable

__all__ = ["nimare_dataset", "nimare_kernel", "nimare_maps"]


def nimare_kernel(spec: KernelSpec, grid: Grid):
    """``ALEKernel`` / ``MKDAKernel`` with the parameters that define ``spec`` on ``grid``."""
    from nimare.meta.kernel import ALEKernel, MKDAKernel

    if spec.name == "ale":
        return ALEKernel(fwhm=spec.nimare_fwhm(grid.resolution_mm))
    return MKDAKernel(r=spec.radius, value=1)


def nimare_dataset(source: SourceTable, ids: list[str], grid: Grid):
    """A NiMARE ``Dataset`` of the given rows' in-mask peaks (MNI mm), masked by ``grid``.

    The study id ``neurosynth:123`` becomes ``neurosynth_123`` (NiMARE ids are ``<study>-<contrast>``).
    """
    from nimare.dataset import Dataset

    wanted = {i: n for n, i in enumerate(ids)}
    row_ids = source.rows["id"].to_numpy()
    peaks = source.peaks[source.peaks["row"].map(lambda r: row_ids[r] in wanted)]
    xyz = peaks[["x", "y", "z"]].to_numpy()
    inside = grid.in_mask(grid.voxels(xyz))
    frame = peaks[inside].assign(sid=[row_ids[r] for r in peaks["row"].to_numpy()[inside]])
    data = {
        sid.replace(":", "_"): {
            "contrasts": {
                "1": {"coords": {"space": "MNI", "x": g["x"].tolist(), "y": g["y"].tolist(), "z": g["z"].tolist()}}
            }
        }
        for sid, g in frame.groupby("sid", sort=False)
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Dataset(data, mask=grid.mask_img())


def nimare_maps(spec: KernelSpec, grid: Grid, dataset, ids: list[str], return_type: str = "array") -> np.ndarray:
    """NiMARE's masked MA maps ``[len(ids), n_mask_voxels]`` in the order of ``ids``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = nimare_kernel(spec, grid).transform(dataset, return_type=return_type)
    if return_type != "array":
        return out
    order = {i: n for n, i in enumerate(np.unique(dataset.coordinates["id"]))}
    return out[[order[i.replace(":", "_") + "-1"] for i in ids]]
