"""Benchmark: seconds per map of the evaluation's IWAE bound (k samples) on a trained run (prints, asserts nothing).

    python scripts/bench_eval.py --run-dir RUN --dataset-dir DATA [--k 64] [--maps 32] [--batch-size 8] [--threads 1]

Runs the same code path as ``evaluate`` (``passes.score_network`` with only the bound switched on) on the
first ``--maps`` test maps and extrapolates to the full-v7 test split (1,432 maps).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cbvae_ext.data import load_dataset_info
from cbvae_ext.data.sources import file_sha256
from cbvae_ext.evaluation.passes import PassOptions, load_split, score_network
from cbvae_ext.evaluation.workflow import load_run

FULL_TEST_MAPS = 1432


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--dataset-dir", required=True)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--maps", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1: CPU cost without spin-waiting)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = load_dataset_info(args.dataset_dir)
    run = load_run(args.run_dir, info.schema, info.mask.shape, args.device, file_sha256(info.path / "manifest.json"))
    data = load_split(info, info.rows("test")[: args.maps])
    gen = torch.Generator().manual_seed(0)
    for k in (1, args.k):
        options = PassOptions(iwae_k=k)
        tic, cpu = time.perf_counter(), time.process_time()
        res = score_network(run.model, data, np.asarray(info.mask), None, options, args.batch_size, args.device, gen)
        total, cpu = time.perf_counter() - tic, time.process_time() - cpu
        per_map = res["seconds"]["iwae"] / data.n
        print(
            f"k={k:3d}: {data.n} maps in {total:.1f} s wall, {cpu:.1f} s CPU (bound {res['seconds']['iwae']:.1f} s, {1000 * per_map:.0f} ms/map); "
            f"{FULL_TEST_MAPS} test maps -> {FULL_TEST_MAPS * per_map / 60:.1f} min; "
            f"torch threads {torch.get_num_threads()}"
        )


if __name__ == "__main__":
    main()
