"""Name the regions a map change touches, offline: Harvard-Oxford cortical regions, and subcortical ones from
Seitzman et al. (2018)'s regions of interest.

nilearn does not ship the Harvard-Oxford atlases (``fetch_atlas_harvard_oxford`` downloads FSL's files);
NiMARE ships the cortical max-probability image (25 % threshold, 2 mm) in ``nimare/resources/atlases``
without the label names, so the 48 names are given here in FSL's order (``HarvardOxford-Cortical.xml``).
The Harvard-Oxford *subcortical* atlas is shipped by neither, so the subcortical names come from the 300 ROI
spheres nilearn ships for ``fetch_coords_seitzman_2018`` (``nilearn/datasets/data``: MNI centres, radii and an
anatomical label each): the hippocampus, amygdala, basal ganglia, thalamus and cerebellum spheres, merged per
structure and hemisphere. Neither atlas is split by hemisphere; the hemisphere is read from the sign of x.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = [
    "HARVARD_OXFORD_CORTICAL",
    "SUBCORTICAL",
    "RegionChange",
    "RegionLabeller",
    "atlas_path",
    "subcortical_spheres",
]

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


#: Seitzman et al. (2018)'s anatomical labels used for subcortical names: label number -> name.
SUBCORTICAL: dict[int, str] = {3: "hippocampus", 4: "amygdala", 5: "basal ganglia", 6: "thalamus", 7: "cerebellum"}
_SEITZMAN_ROIS = "seitzman_2018_ROIs_300inVol_MNI_allInfo.txt"
_SEITZMAN_LABELS = "seitzman_2018_ROIs_anatomicalLabels.txt"


def subcortical_spheres() -> list[tuple[str, np.ndarray, float]]:
    """``(structure, MNI centre [3], radius mm)`` of Seitzman et al.'s subcortical ROIs, read as nilearn's
    ``fetch_coords_seitzman_2018`` reads them (its bundled files: nothing is downloaded).

    Raises:
        OSError: nilearn's files are missing.
    """
    spec = importlib.util.find_spec("nilearn")  # not nilearn.datasets: importing it costs seconds
    if spec is None or spec.origin is None:
        raise OSError("nilearn is not installed (pip install nilearn)")
    folder = Path(spec.origin).parent / "datasets" / "data"
    rows = (folder / _SEITZMAN_ROIS).read_text().split("\n")[1:]  # header: x y z radius(mm) ...
    labels = (folder / _SEITZMAN_LABELS).read_text().split()[1:]  # header: 0=cortexMid,1=cortexL,...
    rois = [r.split() for r in rows if r.strip()]
    if len(rois) != len(labels):
        raise OSError(f"nilearn's {_SEITZMAN_ROIS} and {_SEITZMAN_LABELS} disagree ({len(rois)} vs {len(labels)})")
    out = []
    for roi, label in zip(rois, labels, strict=True):
        name = SUBCORTICAL.get(int(float(label)))
        if name is not None:
            out.append((name, np.array(roi[:3], dtype=np.float64), float(roi[3])))
    return out


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
    """The atlases put onto a map grid once, then per-region means by ``bincount``.

    Cortical regions: Harvard-Oxford, resampled (nearest neighbour). Subcortical regions: the voxels within each
    Seitzman sphere's radius (at least one voxel size, so that a coarse grid keeps every sphere), which take
    precedence over a cortical label where the two meet.

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
        affine = np.asarray(affine, dtype=np.float64)
        ijk = np.indices(shape).reshape(3, -1)
        left = (affine[0, :3] @ ijk + affine[0, 3]).reshape(shape) < 0
        # region r in the left hemisphere -> 2r - 1, right -> 2r (0 = none)
        self.names = ["none"] + [f"{side} {name}" for name in HARVARD_OXFORD_CORTICAL for side in ("left", "right")]
        ids = np.where(labels > 0, 2 * labels - left, 0)
        structures = list(dict.fromkeys(SUBCORTICAL.values()))
        self.names += [f"{side} {name}" for name in structures for side in ("left", "right")]
        voxel_mm = float(np.abs(np.linalg.det(affine[:3, :3])) ** (1 / 3))
        to_voxel = np.linalg.inv(affine)
        for name, centre, radius in subcortical_spheres():
            reach = max(radius, voxel_mm)
            # the voxels of a box around the centre, then those within reach (mm)
            mid = np.rint(to_voxel[:3, :3] @ centre + to_voxel[:3, 3]).astype(int)
            half = int(np.ceil(reach / voxel_mm)) + 1
            lo, hi = np.maximum(mid - half, 0), np.minimum(mid + half + 1, shape)
            if np.any(lo >= hi):
                continue
            box = np.stack(np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi, strict=True)), indexing="ij"))
            mm = np.einsum("ij,j...->i...", affine[:3, :3], box) + affine[:3, 3].reshape(3, 1, 1, 1)
            inside = np.linalg.norm(mm - centre.reshape(3, 1, 1, 1), axis=0) <= reach
            base = 2 * len(HARVARD_OXFORD_CORTICAL) + 2 * structures.index(name) + 1
            ids[tuple(b[inside] for b in box)] = base + (centre[0] >= 0)
        self.ids = ids * np.asarray(mask, dtype=bool)
        self.n_ids = len(self.names)
        self.counts = np.bincount(self.ids.ravel(), minlength=self.n_ids)
        self.min_voxels = min_voxels

    def name(self, region_id: int) -> str:
        """``left``/``right`` and the region's name."""
        return self.names[region_id]

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
