"""Fast modeled-activation (MA) maps: one precomputed kernel pasted at every peak.

NiMARE builds the same maps (``ALEKernel(fwhm=...)``, ``MKDAKernel(r=..., value=1)``): the kernel
is centred on each focus' voxel (``floor(size / 2)`` is the centre), a study's kernels are combined
by voxel-wise maximum, and everything outside the brain mask is zeroed. We paste a dense kernel
cube straight into dense output maps with a small numba loop instead, which is the same arithmetic
without the sparse bookkeeping (``tests/test_data_nimare_equality.py`` checks the equality at 2 mm).

ALE: ``kernel_fwhm_mm`` is the Gaussian's full width at half maximum in mm (sigma = FWHM / 2.3548; not the
metadata field ``fwhm``, a study's own smoothing). NiMARE's
``get_ale_kernel`` computes ``sigma_vox = fwhm / sqrt(voxel volume) / sqrt(4 ln 2)``, which is exactly
that at 2 mm but not at other voxel sizes, so we pass it
``nimare_fwhm = kernel_fwhm_mm * sqrt(voxel volume) / (sqrt(2) * voxel edge)`` (= the FWHM at 2 mm, 1.41 x it
at 4 mm); the kernel then has the stated width in mm at every resolution. MKDA: a binary sphere of radius ``radius`` mm (NiMARE's
``sphere_kernel_offsets``), value 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numba
import numpy as np

from .errors import DataError
from .grid import Grid

__all__ = [
    "DEFAULT_KERNEL_FWHM_MM",
    "DEFAULT_RADIUS",
    "KERNELS",
    "KERNEL_FLOOR",
    "MAX_KERNEL_MM",
    "KernelSpec",
    "render_maps",
]

#: ALE Gaussian FWHM in mm; NiMARE's sample-size formula gives about 9-10 mm for 20 subjects.
DEFAULT_KERNEL_FWHM_MM = 10.0
#: MKDA sphere radius in mm (NiMARE's default).
DEFAULT_RADIUS = 10.0
#: Kernel entries below this fraction of the kernel's peak are not pasted. NiMARE keeps the Gaussian's
#: tails down to 2e-16; the far tails hold 7x more voxels than the rest at 4 mm but change no map by
#: more than 1e-7 of its peak (below float16 resolution), so dropping them is the main speed-up.
KERNEL_FLOOR = 1e-7
KERNELS = ("ale", "mkda")
#: Largest accepted ALE FWHM / MKDA radius in mm: a kernel wider than this blurs a map across most of the
#: brain (the MNI box is ~180 mm), and its dense cube would exhaust memory long before 1e5 mm.
MAX_KERNEL_MM = 60.0


@dataclass(frozen=True)
class KernelSpec:
    """Which kernel and its parameter.

    Args:
        name: ``"ale"`` or ``"mkda"``.
        kernel_fwhm_mm: ALE Gaussian FWHM in mm.
        radius: MKDA sphere radius in mm.
    """

    name: str = "ale"
    kernel_fwhm_mm: float = DEFAULT_KERNEL_FWHM_MM
    radius: float = DEFAULT_RADIUS

    def __post_init__(self) -> None:
        if self.name not in KERNELS:
            raise DataError(f"--kernel {self.name!r} is not supported; use one of {', '.join(KERNELS)}")
        value, flag = (self.kernel_fwhm_mm, "--kernel-fwhm") if self.name == "ale" else (self.radius, "--radius")
        if not (math.isfinite(value) and 0 < value <= MAX_KERNEL_MM):
            raise DataError(f"{flag} {value:g} is outside the valid range (0, {MAX_KERNEL_MM:g}] mm; choose e.g. 10")

    @classmethod
    def from_dict(cls, spec: dict) -> KernelSpec:
        """The kernel a dataset's ``manifest.json`` ``kernel`` entry describes (``to_dict``'s output)."""
        fwhm = spec.get("kernel_fwhm_mm", spec.get("fwhm_mm", DEFAULT_KERNEL_FWHM_MM))  # fwhm_mm: older manifests
        return cls(str(spec["name"]), float(fwhm), float(spec.get("radius_mm", DEFAULT_RADIUS)))

    def nimare_fwhm(self, resolution_mm: float) -> float:
        """The ``fwhm`` to give NiMARE's ``get_ale_kernel``/``ALEKernel`` for this kernel on the isotropic grid
        of ``resolution_mm`` voxels (``Grid.resolution_mm``: the builder's cache key needs it before the grid)."""
        zooms = np.full(3, float(resolution_mm))
        return float(self.kernel_fwhm_mm * np.sqrt(np.prod(zooms)) / (np.sqrt(2.0) * zooms.mean()))

    def to_dict(self, resolution_mm: float) -> dict:
        if self.name == "ale":
            return {
                "name": "ale",
                "kernel_fwhm_mm": self.kernel_fwhm_mm,
                "nimare_fwhm": self.nimare_fwhm(resolution_mm),
                "combine": "max",
                "nimare_equivalent": f"ALEKernel(fwhm={self.nimare_fwhm(resolution_mm):.6g})",
            }
        return {
            "name": "mkda",
            "radius_mm": self.radius,
            "value": 1.0,
            "combine": "max",
            "nimare_equivalent": f"MKDAKernel(r={self.radius:g}, value=1)",
        }

    def cube(self, grid: Grid) -> np.ndarray:
        """The dense kernel, odd-sized, centred at ``floor(size / 2)`` like NiMARE's, float32."""
        if self.name == "ale":
            from nimare.meta.utils import get_ale_kernel

            _, kernel = get_ale_kernel(grid.mask_img(), fwhm=self.nimare_fwhm(grid.resolution_mm))
            return kernel.astype(np.float32)
        from nimare.meta.utils import sphere_kernel_offsets

        offsets = sphere_kernel_offsets(self.radius, np.abs(np.diag(grid.affine)[:3]))
        half = int(np.abs(offsets).max())
        cube = np.zeros((2 * half + 1,) * 3, dtype=np.float32)
        cube[tuple((offsets + half).T)] = 1.0
        return cube


@numba.njit(cache=True, nogil=True, parallel=True)
def _paste_max(out, starts, bounds, first, offsets, flat_offsets, values, shape, mask):  # pragma: no cover - numba
    """``out[b]`` (flattened volume) = voxel-wise max of the kernel at every peak of row ``first + b``, in-mask only.

    Maps are independent, so they are spread over the cores (``prange``); ``out`` need not be zeroed.
    """
    dim_i, dim_j, dim_k = shape[0], shape[1], shape[2]
    span = offsets.max()
    for b in numba.prange(out.shape[0]):
        vol = out[b]
        vol[:] = 0  # zeroed here, in parallel, rather than by numpy on one core
        for p in range(bounds[first + b], bounds[first + b + 1]):
            i0, j0, k0 = starts[p, 0], starts[p, 1], starts[p, 2]
            base = (i0 * dim_j + j0) * dim_k + k0
            inside = i0 >= 0 and j0 >= 0 and k0 >= 0 and i0 + span < dim_i and j0 + span < dim_j and k0 + span < dim_k
            for q in range(values.shape[0]):
                if not inside:
                    i, j, k = i0 + offsets[q, 0], j0 + offsets[q, 1], k0 + offsets[q, 2]
                    if i < 0 or j < 0 or k < 0 or i >= dim_i or j >= dim_j or k >= dim_k:
                        continue
                idx = base + flat_offsets[q]
                if mask[idx] and values[q] > vol[idx]:
                    vol[idx] = values[q]


def render_maps(
    kernel: np.ndarray,
    ijk: np.ndarray,
    row: np.ndarray,
    n_rows: int,
    mask: np.ndarray,
    batch_size: int = 256,
    dtype: np.dtype | str = np.float32,
) -> Iterator[np.ndarray]:
    """Yield the masked MA maps of rows ``0..n_rows-1`` in order, ``batch_size`` at a time.

    Each yielded batch is a view of one reused buffer, valid until the next one is requested: copy it
    (write it out) before asking for more.

    Args:
        kernel: dense kernel cube from ``KernelSpec.cube``.
        ijk: ``[P, 3]`` voxel index of each peak (inside the grid).
        row: ``[P]`` map (row) index of each peak.
        n_rows: number of maps.
        mask: bool brain mask ``[D, H, W]``.
        batch_size: maps per yielded batch; bounds the memory in use.
        dtype: ``float32`` or ``float16``.
    """
    dtype = np.dtype(dtype)
    shape = np.array(mask.shape, dtype=np.int64)
    order = np.argsort(row, kind="stable")
    starts = np.ascontiguousarray(np.asarray(ijk, dtype=np.int64)[order] - np.array(kernel.shape) // 2)
    bounds = np.searchsorted(np.asarray(row)[order], np.arange(n_rows + 1)).astype(np.int64)
    offsets = np.argwhere(kernel > KERNEL_FLOOR * kernel.max()).astype(np.int64)
    flat_offsets = (offsets[:, 0] * shape[1] + offsets[:, 1]) * shape[2] + offsets[:, 2]
    # float16 maps are pasted as their uint16 bit patterns: for non-negative floats the integer order
    # is the float order, and rounding is monotonic, so max-then-round == round-then-max
    values = kernel[tuple(offsets.T)].astype(dtype)
    work = np.uint16 if dtype == np.float16 else dtype
    values = values.view(work)
    flat_mask = np.ascontiguousarray(mask, dtype=np.bool_).ravel()
    # one buffer for every batch: fresh pages cost more (page faults) than pasting the kernels
    buffer = np.empty((min(batch_size, n_rows), flat_mask.size), dtype=work)
    for first in range(0, n_rows, batch_size):
        buf = buffer[: min(batch_size, n_rows - first)]
        _paste_max(buf, starts, bounds, first, offsets, flat_offsets, values, shape, flat_mask)
        yield buf.view(dtype).reshape(-1, *mask.shape)
