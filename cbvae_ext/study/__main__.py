"""``python -m cbvae_ext.study FILE --run_dir RUN [--dataset_dir DATA] --out DIR``: a study file to maps and a report.

Bad input prints one line naming the problem and the fix, and exits with status 2 (nothing is written).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from cbvae_ext.errors import CbvaeError

from .options import TYPICALITY_SCORES
from .readers import MAX_PEAKS

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cbvae_ext.study",
        description="Analyse your own study (Sleuth .txt, .csv/.tsv, NiMARE/NeuroStore .json, or a .nii.gz map) "
        "with a trained run: MA map, posterior, reconstruction, nearest studies, typicality percentile.",
    )
    p.add_argument("file", help="the study file (or a NiMARE parquet studyset folder)")
    p.add_argument("--run_dir", required=True, help="trained and exported run folder")
    p.add_argument("--dataset_dir", help="the run's dataset (kernel, nearest studies, typicality reference)")
    p.add_argument("--out", required=True, help="output folder (replaced only if it is an earlier study report)")
    p.add_argument("--space", help="MNI or TAL, for peaks whose file gives no space")
    p.add_argument("--outside", choices=("drop", "keep"), default="drop", help="peaks outside the brain mask")
    p.add_argument("--max_peaks", type=int, default=MAX_PEAKS, help=f"most peaks per study (default {MAX_PEAKS})")
    p.add_argument("--year", type=float, help="publication year (overrides the file's)")
    p.add_argument("--sample_size", type=float, help="number of subjects (overrides the file's)")
    p.add_argument("--task", help="task category (one of the run's categories)")
    p.add_argument("--text", help="title or abstract (mapped to topic weights when the run takes topics)")
    p.add_argument("--allow_extrapolation", action="store_true", help="accept conditions outside the training range")
    p.add_argument("--k", type=int, default=8, help="posterior samples of the typicality ELBO (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of those samples")
    p.add_argument(
        "--typicality_score", choices=list(TYPICALITY_SCORES), default=next(iter(TYPICALITY_SCORES)),
        help="what the typicality percentile ranks: peak_density (default: log density of the model's prior-predictive "
        "map at the peaks, per peak) or elbo (the whole-map ELBO plus its entropy floor)",
    )  # fmt: skip
    p.add_argument("--no_cache", action="store_true", help="do not cache the test studies' typicality scores")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        from . import analyse_file

        started = time.perf_counter()
        meta = {"year": args.year, "sample_size": args.sample_size, "task": args.task, "text": args.text}
        analysis = analyse_file(
            args.file,
            args.run_dir,
            args.dataset_dir,
            open_options={
                "k": args.k,
                "seed": args.seed,
                "cache": not args.no_cache,
                "typicality_score": args.typicality_score,
            },
            space=args.space,
            outside=args.outside,
            max_peaks=args.max_peaks,
            metadata={k: v for k, v in meta.items() if v is not None},
            allow_extrapolation=args.allow_extrapolation,
        )
        analysis.seconds = time.perf_counter() - started
        out = analysis.write(args.out)
    except CbvaeError as err:
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
    for report, result in zip(analysis.reports, analysis.results, strict=True):
        typ = report["typicality"]
        pct = "n/a" if typ is None else f"{typ['percentile']:.1f}"
        near = report["nearest"][0] if report["nearest"] else None
        print(
            f"{result.study.name}: {result.peaks['used']} peaks, typicality percentile {pct}"
            + (f", nearest {near['id']} (r={near['r']:.2f})" if near else "")
        )
        for warning in result.warnings:
            print(f"  warning: {warning}")
    print(f"wrote {out} in {analysis.seconds:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
