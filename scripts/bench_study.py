"""Time a one-study Sleuth file to its written report (``cbvae_ext.study``), in one process.

Usage: ``python scripts/bench_study.py --run_dir RUN --dataset_dir DATA [--repeats N] [--threads 2]``. The study
is a real MNI test-split study of DATA, its peaks read from the Neurosynth files (``--neurosynth_dir``, default
``../shared/data/neurosynth``) and written as a Sleuth file. Prints:

* ``imports_s``: importing cbvae_ext.study, NiMARE's readers and torch (Python start-up, not counted in the goal);
* ``cold_s``: opening the run and the dataset, scoring the test split (no cache), reading the file, analysing it
  and writing the report: what the CLI costs the first time;
* ``cached_s``: the same with the test split's scores read from the cache (every later CLI call);
* ``warm_s``: an open ``StudyContext`` (the app): file -> report, median over ``--repeats``;
* the CPU seconds of each (``time.process_time``, all threads), which a busy machine does not inflate.

The goal is ≤ 2 s on 2 CPU cores. Run it on an idle machine: other processes on the cores inflate every wall time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

__all__: list[str] = []


def main() -> None:
    t0 = time.perf_counter()
    import nimare.io  # noqa: F401 - imports are timed separately
    import numpy as np
    import pandas as pd
    import torch

    from cbvae_ext.data import load_dataset_info
    from cbvae_ext.study import StudyContext, analyse_file

    imports = time.perf_counter() - t0
    p = argparse.ArgumentParser()
    p.add_argument("--run_dir", required=True)
    p.add_argument("--dataset_dir", required=True)
    p.add_argument("--neurosynth_dir", default=str(Path(__file__).resolve().parents[2] / "shared/data/neurosynth"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    info = load_dataset_info(args.dataset_dir)
    row = info.metadata[(info.metadata["split"] == "test") & (info.metadata["space"] == "MNI")].iloc[0]
    coords = pd.read_csv(
        Path(args.neurosynth_dir) / "data-neurosynth_version-7_coordinates.tsv.gz", sep="\t", dtype={"id": str}
    )
    xyz = coords.loc[coords["id"] == row["id"].split(":", 1)[1], ["x", "y", "z"]].to_numpy(np.float64)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        sleuth = tmp / "study.txt"
        sleuth.write_text(
            "// Reference=MNI\n// one study\n// Subjects=20\n" + "\n".join(" ".join(f"{v:g}" for v in p) for p in xyz)
        )
        os.environ["CBVAE_CACHE_DIR"] = str(tmp / "cache")

        cpu: list[float] = []

        def once(context: StudyContext | None, out: str) -> float:
            start, start_cpu = time.perf_counter(), time.process_time()
            ctx = context or StudyContext.open(args.run_dir, args.dataset_dir)
            analyse_file(sleuth, context=ctx).write(tmp / out)
            cpu.append(time.process_time() - start_cpu)
            return time.perf_counter() - start

        cold = once(None, "cold")
        cached = once(None, "cached")
        context = StudyContext.open(args.run_dir, args.dataset_dir)
        once(context, "warmup")
        warm = statistics.median(once(context, f"warm{i}") for i in range(args.repeats))
    print(
        f"study bench: {len(xyz)} peaks, {len(info.rows('test'))} test studies, k={context.k}, "
        f"{args.threads} torch threads, grid {list(info.maps.shape[1:])}"
    )
    print(f"imports_s={imports:.2f} cold_s={cold:.2f} cached_s={cached:.2f} warm_s={warm:.2f} (wall)")
    print(f"cpu seconds (all threads): cold {cpu[0]:.2f} cached {cpu[1]:.2f} warm {statistics.median(cpu[3:]):.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
