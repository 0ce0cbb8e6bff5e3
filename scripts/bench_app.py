"""Time one interaction of the Counterfactual Machine on a run folder: decode, year sweep and rendering.

Usage: ``python scripts/bench_app.py [RUN_DIR] [--repeats N]`` (default ``runs/cbvae``). Prints median
milliseconds per step; the app's budget is ≤ 50 ms decode and ≤ 300 ms per interaction.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from cbvae_ext import app_logic as al
from cbvae_ext import inference

__all__: list[str] = []


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (TorchScript profiling runs, caches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default="runs/cbvae")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    info = al.load_run_info(run_dir)
    model = inference.load(run_dir)
    renderer = al.SliceRenderer(info.affine, info.mask.shape, info.mask)
    start = al.prior_start(info, 0)
    conditions = {**start.conditions, "task": info.schema.categories[0]}
    years = al.sweep_years(info.schema)
    z = start.z
    current = model.decode(z, conditions, allow_extrapolation=True).map
    sweep_z = np.repeat(z[None], len(years), 0)
    sweep_c = [{**conditions, "year": float(y)} for y in years]
    figures = {
        "decode (1 map)": _median_ms(lambda: model.decode(z, conditions, allow_extrapolation=True), args.repeats),
        f"year sweep decode ({len(years)} maps)": _median_ms(
            lambda: model.decode_many(sweep_z, sweep_c, allow_extrapolation=True), args.repeats
        ),
        "render ortho (x2: generated + difference)": 2
        * _median_ms(lambda: renderer.ortho(current, (0.0, -18.0, 18.0), threshold=0.1), args.repeats),
        f"render year sweep ({len(years)} axial)": len(years)
        * _median_ms(lambda: renderer.axial(current, 18.0, threshold=0.1), args.repeats),
    }
    total = sum(figures.values())
    print(f"run {run_dir} · grid {info.mask.shape} · {info.latent_size} latents")
    for name, ms in figures.items():
        print(f"{name:45s} {ms:8.1f} ms")
    print(f"{'one interaction (latent or condition change)':45s} {total:8.1f} ms")


if __name__ == "__main__":
    main()
