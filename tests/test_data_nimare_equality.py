"""Correctness anchor: at 2 mm our maps equal NiMARE's ALEKernel / MKDAKernel output on >= 50 real studies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cbvae_ext.data import build_dataset, load_dataset_info
from cbvae_ext.data.grid import make_grid
from cbvae_ext.data.kernels import KernelSpec
from cbvae_ext.data.reference import nimare_dataset, nimare_maps
from cbvae_ext.data.sources import read_neurosynth

N_STUDIES = 52


@pytest.fixture(scope="module")
def source(neurosynth_dir: Path):
    return read_neurosynth(neurosynth_dir)


@pytest.mark.parametrize("kernel", ["ale", "mkda"])
def test_maps_equal_nimare_at_2mm(kernel: str, neurosynth_dir: Path, source, tmp_path: Path) -> None:
    out = build_dataset(
        neurosynth_dir=neurosynth_dir, out=tmp_path / kernel, subset=N_STUDIES, resolution=2, kernel=kernel,
        dtype="float32",
    )  # fmt: skip
    info = load_dataset_info(out)
    assert info.maps.shape == (N_STUDIES, 96, 112, 96)
    spec, grid = KernelSpec(kernel), make_grid(2)
    if kernel == "ale":  # at 2 mm the parameter is literally NiMARE's: ALEKernel(fwhm=10)
        assert info.manifest["kernel"]["nimare_fwhm"] == info.manifest["kernel"]["kernel_fwhm_mm"] == 10.0
    else:
        assert info.manifest["kernel"]["nimare_equivalent"] == "MKDAKernel(r=10, value=1)"
    ids = info.metadata["id"].tolist()
    theirs = nimare_maps(spec, grid, nimare_dataset(source, ids, grid), ids)
    ours = np.asarray(info.maps)[:, info.mask]
    assert ours.shape == theirs.shape
    assert (theirs.max(axis=1) > 0).all()
    assert np.abs(ours - theirs).max() <= 1e-4
    assert np.abs(ours - theirs).max() <= 1e-6 * np.abs(theirs).max()  # in fact equal up to float32 rounding
