"""Time a one-study Sleuth file to its written report (``cbvae_ext.study``), in one process.

Usage: ``python scripts/bench_study.py --run_dir RUN --dataset_dir DATA [--repeats N] [--threads 2] [--browser]``.
The study is a real MNI test-split study of DATA, its peaks read from the Neurosynth files (``--neurosynth_dir``,
default ``../shared/data/neurosynth``) and written as a Sleuth file. Prints:

* ``imports_s``: importing cbvae_ext.study, NiMARE's readers and torch (Python start-up, not counted in the goal);
* ``cold_s``: opening the run and the dataset, scoring the test split (no cache), reading the file, analysing it
  and writing the report: what the CLI costs the first time;
* ``cached_s``: the same with the test split's scores read from the cache (every later CLI call);
* ``warm_s``: an open ``StudyContext`` (the app): file -> report, median over ``--repeats``;
* the CPU seconds of each (``time.process_time``, all threads), which a busy machine does not inflate;
* with ``--browser``, the page path (``streamlit run`` served locally, headless Chromium through the harness of
  ``tests/app_browser.py``): from choosing the file in the "Your study" uploader to its view rendered (heading,
  typicality sentence, MA map image loaded). ``browser_first_s``: the first upload of the server (it opens the
  run's ``StudyContext``, the test split's scores read from the cache the runs above wrote); ``browser_s``: median
  over ``--repeats`` uploads of the same peaks under another study name (each one a new analysis).

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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

__all__: list[str] = []


def browser_times(run_dir: Path, dataset_dir: Path, xyz: np.ndarray, tmp: Path, repeats: int) -> tuple[float, float]:
    """Seconds from setting a one-study Sleuth file on the served page's uploader to the "Your study" view
    rendered: the server's first upload, and the median of ``repeats`` later ones (a new study name each)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from app_browser import UPLOAD_INPUT, BrowserError, HeadlessChromium, serve_app, your_study_shown

    times = []
    with serve_app(run_dir, dataset_dir) as url:
        browser = HeadlessChromium(tmp / "profile")
        try:
            browser.open_app(url, min_images=8, timeout=300)
            browser.start_from_your_study()
            for i in range(repeats + 1):
                name = f"study{i}"
                path = _write_sleuth(tmp / f"{name}.txt", name, xyz)
                start = time.perf_counter()
                browser.set_files(UPLOAD_INPUT, path)
                state = browser.wait_until(
                    lambda s, n=name: your_study_shown(s, f"your study {n} ({n}.txt)"), timeout=300, poll=0.05, settle=0
                )
                if not your_study_shown(state, f"your study {name} ({name}.txt)"):
                    raise BrowserError(f"the page did not show {name}: {state['text'][:1000]}")
                times.append(time.perf_counter() - start)
        finally:
            browser.close()
    return times[0], statistics.median(times[1:])


def _write_sleuth(path: Path, name: str, xyz: np.ndarray) -> Path:
    """A one-study MNI Sleuth file of these peaks."""
    path.write_text(
        f"// Reference=MNI\n// {name}\n// Subjects=20\n" + "\n".join(" ".join(f"{v:g}" for v in p) for p in xyz)
    )
    return path


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
    p.add_argument("--browser", action="store_true", help="also time the page path: upload to its view rendered")
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
        sleuth = _write_sleuth(tmp / "study.txt", "one study", xyz)
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
        if args.browser:  # the served app reads the test split's scores from this cache
            page = browser_times(Path(args.run_dir), Path(args.dataset_dir), xyz, tmp, args.repeats)
    print(
        f"study bench: {len(xyz)} peaks, {len(info.rows('test'))} test studies, k={context.k}, "
        f"{args.threads} torch threads, grid {list(info.maps.shape[1:])}"
    )
    print(f"imports_s={imports:.2f} cold_s={cold:.2f} cached_s={cached:.2f} warm_s={warm:.2f} (wall)")
    print(f"cpu seconds (all threads): cold {cpu[0]:.2f} cached {cpu[1]:.2f} warm {statistics.median(cpu[3:]):.2f}")
    if args.browser:
        print(f"browser_first_s={page[0]:.2f} browser_s={page[1]:.2f} (wall: file chosen -> Your study view rendered)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
