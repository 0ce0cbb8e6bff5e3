"""Benchmark the dataset builder against NiMARE's kernel transformer and time a full Neurosynth v7 build.

Prints, for the same real studies (default 500): our builder end to end (read + maps + write), our
map making alone, NiMARE's ``ALEKernel``/``MKDAKernel`` transform (dense ``array`` and per-study
``image`` outputs) and the ratios; then the wall time and peak RSS of a full v7 build at 4 mm, run as
a separate ``python -m cbvae_ext.data build`` process.

Usage: python scripts/bench_data.py [--neurosynth-dir DIR] [--n-studies 500] [--kernel ale] [--skip-full]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cbvae_ext.data import build_dataset, load_dataset_info
from cbvae_ext.data.grid import make_grid
from cbvae_ext.data.kernels import KernelSpec, render_maps
from cbvae_ext.data.reference import nimare_dataset, nimare_kernel, nimare_maps
from cbvae_ext.data.sources import read_neurosynth

__all__ = ["main"]

REPO = Path(__file__).resolve().parents[1]
#: timed runs of each map maker; the best is reported
REPEATS = 5


def _timed(fn, repeats: int = 1):
    """Result, wall and CPU seconds of this process, each the best of ``repeats`` runs (as ``timeit`` does:
    the minimum is the run least disturbed by the rest of the machine)."""
    walls, cpus = [], []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return out, min(walls), min(cpus)


def _render_all(kernel, ijk, row, n, mask, keep: bool = False) -> np.ndarray | None:
    """Our map making in the builder's float16; ``keep`` gathers float32 masked voxels for the comparison."""
    kept = [batch[:, mask] for batch in render_maps(kernel, ijk, row, n, mask)] if keep else None
    if not keep:
        for _ in render_maps(kernel, ijk, row, n, mask, dtype=np.float16):
            pass
    return np.concatenate(kept) if keep else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neurosynth-dir", default=str(REPO.parent / "shared" / "data" / "neurosynth"))
    parser.add_argument("--n-studies", type=int, default=500)
    parser.add_argument("--resolution", type=int, default=4)
    parser.add_argument("--kernel", default="ale", choices=("ale", "mkda"))
    parser.add_argument("--skip-full", action="store_true")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPU cores; grid {args.resolution} mm; kernel {args.kernel}")

    with tempfile.TemporaryDirectory() as tmp:
        out, t_build, _ = _timed(
            lambda: build_dataset(
                neurosynth_dir=args.neurosynth_dir, out=Path(tmp) / "bench", subset=args.n_studies,
                resolution=args.resolution, kernel=args.kernel, force=True,
            )
        )  # fmt: skip
        info = load_dataset_info(out)
        ids = info.metadata["id"].tolist()
        grid, spec = make_grid(args.resolution), KernelSpec(args.kernel)
        source = read_neurosynth(args.neurosynth_dir)
        dset = nimare_dataset(source, ids, grid)
        nimare_maps(spec, grid, nimare_dataset(source, ids[:5], grid), ids[:5])  # warm up numba's JIT cache
        theirs, t_array, c_array = _timed(lambda: nimare_maps(spec, grid, dset, ids), REPEATS)
        _, t_image, c_image = _timed(lambda: nimare_maps(spec, grid, dset, ids, return_type="image"), REPEATS)
        # our map making alone, on exactly the peaks NiMARE got
        c = dset.coordinates.sort_values("id", kind="stable")
        ijk = grid.voxels(c[["x", "y", "z"]].to_numpy())
        row = np.unique(c["id"].to_numpy(), return_inverse=True)[1]
        cube = spec.cube(grid)
        _render_all(cube, ijk[:50], np.zeros(50, dtype=np.int64), 1, grid.mask)  # load numba's compiled code
        _, t_render, c_render = _timed(lambda: _render_all(cube, ijk, row, len(ids), grid.mask), REPEATS)
        maps = _render_all(cube, ijk, row, len(ids), grid.mask, keep=True)
        order = np.argsort([i.replace(":", "_") + "-1" for i in ids])
        diff = float(np.abs(maps[np.argsort(order)] - theirs).max())

    n = len(ids)
    print(f"studies: {n} real Neurosynth v7 studies ({int(info.metadata['n_peaks'].sum())} in-mask peaks)")
    name = type(nimare_kernel(spec, grid)).__name__
    print(f"ours, builder end to end (read sources + maps + write): {t_build:8.2f} s wall")
    print(f"ours, map making only:                     {t_render:8.2f} s wall {c_render:8.2f} s CPU")
    print(f"NiMARE {name}.transform(return_type='array'): {t_array:8.2f} s wall {c_array:8.2f} s CPU")
    print(f"NiMARE {name}.transform(return_type='image'): {t_image:8.2f} s wall {c_image:8.2f} s CPU")
    print(
        f"ratio NiMARE array / our map making: {t_array / t_render:6.1f}x wall, {c_array / c_render:6.1f}x CPU (goal >= 10x)"
    )
    print(f"ratio NiMARE image / our map making: {t_image / t_render:6.1f}x wall, {c_image / c_render:6.1f}x CPU")
    print(f"max |ours - NiMARE| on these maps: {diff:.2e}")

    if args.skip_full:
        return
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "cbvae_ext.data", "build", "--neurosynth-dir", args.neurosynth_dir,
               "--out", str(Path(tmp) / "full"), "--resolution", "4", "--kernel", args.kernel]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=REPO, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
        manifest = json.loads((Path(tmp) / "full" / "manifest.json").read_text())
        size_gb = (Path(tmp) / "full" / "maps.npy").stat().st_size / 1024**3
    c = manifest["counts"]["neurosynth"]
    print(
        f"full v7 build at 4 mm: {manifest['n_maps']} maps {manifest['grid']['shape']} {manifest['dtype']} ({size_gb:.2f} GiB)"
    )
    print(
        f"  read {c['studies_read']} studies / {c['peaks_read']} peaks; dropped {c['peaks_outside_mask']} peaks outside the mask,"
    )
    print(f"  {c['studies_without_peaks']} studies with no peak left")
    print(f"  build (inside the process, after imports): {manifest['build_seconds']:.1f} s (goal <= 60 s)")
    print(f"  process wall time incl. Python/NiMARE imports: {wall:.1f} s")
    print(f"  peak RSS: {peak_gb:.2f} GB (goal <= 6 GB)")


if __name__ == "__main__":
    main()
