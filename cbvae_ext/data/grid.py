"""The MNI152 grid and brain mask the maps live on.

The 2 mm grid is NiMARE's ``mni152_2mm`` brain mask (91x109x91, the mask a NiMARE ``Dataset`` uses);
the 4 mm grid is that mask resampled (nearest neighbour) onto a 4 mm lattice with the same origin.
Both are then padded with empty voxels (split evenly, the extra one after) to the next shape divisible
by 8 so that three stride-2 stages fit: 4 mm -> 48x56x48, 2 mm -> 96x112x96. The affine is shifted
by the padding, so world coordinates are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np

from .errors import DataError

__all__ = ["RESOLUTIONS", "Grid", "check_resolution", "make_grid"]

RESOLUTIONS = (2, 4)


@dataclass(frozen=True)
class Grid:
    """A voxel grid in MNI space.

    Args:
        mask: bool brain mask ``[D, H, W]``.
        affine: 4x4 voxel-to-MNI-mm affine.
        resolution_mm: isotropic voxel size.
    """

    mask: np.ndarray
    affine: np.ndarray
    resolution_mm: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.mask.shape)

    def mask_img(self) -> nib.Nifti1Image:
        """The brain mask as a uint8 NIfTI image (what ``mask.nii.gz`` holds; also a NiMARE masker)."""
        img = nib.Nifti1Image(self.mask.astype(np.uint8), self.affine)
        img.header.set_xyzt_units("mm")
        return img

    def to_dict(self) -> dict:
        return {
            "shape": list(self.shape),
            "affine": np.asarray(self.affine).tolist(),
            "resolution_mm": self.resolution_mm,
            "n_mask_voxels": int(self.mask.sum()),
            "template": "NiMARE mni152_2mm brain mask (MNI152NLin6Asym)",
        }

    def voxels(self, xyz: np.ndarray) -> np.ndarray:
        """MNI mm -> integer voxel indices, rounded exactly as NiMARE does (``nimare.utils.mm2vox``)."""
        from nimare.utils import mm2vox

        return mm2vox(np.asarray(xyz, dtype=np.float64), self.affine).astype(np.int64)

    def in_mask(self, ijk: np.ndarray) -> np.ndarray:
        """Whether each voxel index lies inside the grid and the brain mask."""
        inside = np.all((ijk >= 0) & (ijk < np.array(self.shape)), axis=1)
        out = np.zeros(len(ijk), dtype=bool)
        i, j, k = ijk[inside].T
        out[inside] = self.mask[i, j, k]
        return out


def _pad_to_multiple(mask: np.ndarray, affine: np.ndarray, multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
    target = -(-np.array(mask.shape) // multiple) * multiple
    before = (target - mask.shape) // 2
    padded = np.pad(mask, [(int(b), int(t - s - b)) for b, t, s in zip(before, target, mask.shape, strict=True)])
    affine = affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ before
    return padded, affine


def check_resolution(resolution: int) -> None:
    """Raise ``DataError`` for a voxel size the grids do not come in."""
    if resolution not in RESOLUTIONS:
        raise DataError(f"--resolution {resolution} is not supported; use one of {', '.join(map(str, RESOLUTIONS))}")


def make_grid(resolution: int = 4) -> Grid:
    """The padded MNI152 brain-mask grid at ``resolution`` mm (2 or 4).

    Raises:
        DataError: for an unsupported resolution.
    """
    check_resolution(resolution)
    from nilearn.image import resample_img
    from nimare.utils import get_template

    img = get_template("mni152_2mm", mask="brain")
    if resolution != 2:
        affine = img.affine.copy()
        affine[:3, :3] = np.eye(3) * resolution
        shape = tuple(int(np.ceil(s * 2 / resolution)) for s in img.shape)
        img = resample_img(
            img,
            target_affine=affine,
            target_shape=shape,
            interpolation="nearest",
            force_resample=True,
            copy_header=True,
        )
    mask, affine = _pad_to_multiple(np.asarray(img.get_fdata()) > 0, np.asarray(img.affine, dtype=np.float64))
    return Grid(mask=mask, affine=affine, resolution_mm=int(resolution))
