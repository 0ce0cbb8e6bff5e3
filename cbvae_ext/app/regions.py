"""Name the regions a map change touches: the Harvard-Oxford cortical atlas, offline.

nilearn does not ship the Harvard-Oxford atlas (``fetch_atlas_harvard_oxford`` downloads FSL's files);
NiMARE ships its cortical max-probability image (25 % threshold, 2 mm) in ``nimare/resources/atlases``
without the label names, so the 48 names are given here in FSL's order (``HarvardOxford-Cortical.xml``).
The atlas is not split by hemisphere; the hemisphere is read from the sign of x.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["HARVARD_OXFORD_CORTICAL", "RegionChange", "RegionLabeller", "atlas_path"]

#: Label ``i`` (1-based) of the Harvard-Oxford cortical atlas is ``HARVARD_OXFORD_CORTICAL[i - 1]``.
HARVARD_OXFORD_CORTICAL: tuple[str, ...] = (
    "Frontal Pole", "Insular Cortex", "Superior Frontal Gyrus", "Middle Frontal Gyrus",
    "Inferior Frontal Gyrus, pars triangularis", "Inferior Frontal Gyrus, pars opercularis", "Precentral Gyrus",
    "Temporal Pole", "Superior Temporal Gyrus, anterior", "Superior Temporal Gyrus, posterior",
    "Middle Temporal Gyrus, anterior", "Middle Temporal Gyrus, posterior", "Middle Temporal Gyrus, temporooccipital",
    "Inferior Temporal Gyrus, anterior", "Inferior Temporal Gyrus, posterior",
    "Inferior Temporal Gyrus, temporooccipital", "Postcentral Gyrus", "Superior Parietal Lobule",
    "Supramarginal Gyrus, anterior", "Supramarginal Gyrus, posterior", "Angular Gyrus",
    "Lateral Occipital Cortex, superior", "Lateral Occipital Cortex, inferior", "Intracalcarine Cortex",
    "Frontal Medial Cortex", "Supplementary Motor Cortex", "Subcallosal Cortex", "Paracingulate Gyrus",
    "Cingulate Gyrus, anterior", "Cingulate Gyrus, posterior", "Precuneus", "Cuneal Cortex",
    "Frontal Orbital Cortex", "Parahippocampal Gyrus, anterior", "Parahippocampal Gyrus, posterior",
    "Lingual Gyrus", "Temporal Fusiform Cortex, anterior", "Temporal Fusiform Cortex, posterior",
    "Temporal Occipital Fusiform Cortex", "Occipital Fusiform Gyrus", "Frontal Operculum Cortex",
    "Central Opercular Cortex", "Parietal Operculum Cortex", "Planum Polare", "Heschl's Gyrus", "Planum Temporale",
    "Supracalcarine Cortex", "Occipital Pole",
)  # fmt: skip


def atlas_path() -> Path | None:
    """NiMARE's bundled Harvard-Oxford cortical image, or None when NiMARE is not installed."""
    spec = importlib.util.find_spec("nimare")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "resources" / "atlases" / "HarvardOxford-cort-maxprob-thr25-2mm.nii.gz"
    return path if path.is_file() else None


@dataclass
class RegionChange:
    """Mean change of a map inside one atlas region (one hemisphere)."""

    name: str
    mean_change: float
    n_voxels: int


class RegionLabeller:
    """The atlas resampled (nearest neighbour) onto a map grid once, then per-region means by ``bincount``.

    Args:
        affine: the map grid's affine.
        shape: the map grid's shape.
        mask: brain mask on the grid (voxels outside it are not counted).
        min_voxels: regions smaller than this on the grid are skipped (noise on coarse grids).
    """

    def __init__(self, affine: np.ndarray, shape: tuple[int, ...], mask: np.ndarray, min_voxels: int = 3) -> None:
        path = atlas_path()
        if path is None:
            raise FileNotFoundError("NiMARE's Harvard-Oxford atlas is not installed (pip install nimare)")
        from nilearn.image import resample_img

        atlas = resample_img(
            nib.load(path), target_affine=affine, target_shape=shape, interpolation="nearest",
            force_resample=True, copy_header=True,
        )  # fmt: skip
        labels = np.rint(np.asarray(atlas.dataobj)).astype(np.int64)
        ijk = np.indices(shape).reshape(3, -1)
        x = (np.asarray(affine)[0, :3] @ ijk + affine[0, 3]).reshape(shape)
        # region r in the left hemisphere -> 2r - 1, right -> 2r (0 = none)
        self.ids = np.where(labels > 0, 2 * labels - (x < 0), 0) * np.asarray(mask, dtype=bool)
        self.n_ids = 2 * len(HARVARD_OXFORD_CORTICAL) + 1
        self.counts = np.bincount(self.ids.ravel(), minlength=self.n_ids)
        self.min_voxels = min_voxels

    def name(self, region_id: int) -> str:
        side = "left" if region_id % 2 else "right"
        return f"{side} {HARVARD_OXFORD_CORTICAL[(region_id + 1) // 2 - 1]}"

    def changes(self, diff: np.ndarray) -> list[RegionChange]:
        """Mean of ``diff`` per region and hemisphere, sorted from the largest gain to the largest loss."""
        sums = np.bincount(self.ids.ravel(), weights=np.asarray(diff, dtype=np.float64).ravel(), minlength=self.n_ids)
        out = [
            RegionChange(self.name(r), float(sums[r] / self.counts[r]), int(self.counts[r]))
            for r in range(1, self.n_ids)
            if self.counts[r] >= self.min_voxels
        ]
        return sorted(out, key=lambda c: -c.mean_change)

    def summary(
        self, diff: np.ndarray, n: int = 3, floor: float = 0.0
    ) -> tuple[list[RegionChange], list[RegionChange]]:
        """The ``n`` regions that gained most and the ``n`` that lost most (changes beyond ``floor`` only)."""
        changes = self.changes(diff)
        gained = [c for c in changes[:n] if c.mean_change > floor]
        lost = [c for c in reversed(changes[-n:]) if c.mean_change < -floor]
        return gained, lost
