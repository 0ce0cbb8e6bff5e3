"""Command line: ``python -m cbvae_ext.data build ...`` and ``python -m cbvae_ext.data info OUT``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .errors import DataError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from cbvae_ext.schema import TERMS

    from .kernels import DEFAULT_KERNEL_FWHM_MM, DEFAULT_RADIUS, KERNELS
    from .neuroquery import TERM_EMBEDDINGS

    parser = argparse.ArgumentParser(prog="python -m cbvae_ext.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build a dataset folder of MA maps and metadata")
    build.add_argument("--neurosynth-dir", help="Neurosynth v7 files (NiMARE layout); omitted: NiMARE's fetcher")
    build.add_argument("--no-neurosynth", action="store_true", help="build from --neurostore-dir folders only")
    build.add_argument("--neurostore-dir", action="append", default=[], help="NiMARE parquet studyset (repeatable)")
    build.add_argument("--out", required=True, help="dataset folder to write")
    build.add_argument("--subset", type=int, help="keep N Neurosynth studies (deterministic, stratified)")
    build.add_argument("--resolution", type=int, default=4, choices=(2, 4), help="voxel size in mm")
    build.add_argument("--kernel", default="ale", choices=KERNELS)
    build.add_argument(
        "--kernel-fwhm",
        "--fwhm",
        dest="kernel_fwhm_mm",
        type=float,
        default=DEFAULT_KERNEL_FWHM_MM,
        help="ALE kernel's Gaussian FWHM in mm (--fwhm is an alias; not the metadata field fwhm)",
    )
    build.add_argument("--radius", type=float, default=DEFAULT_RADIUS, help="MKDA sphere radius in mm")
    build.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    build.add_argument("--seed", type=int, default=0, help="seed of the subset and split hashes")
    build.add_argument("--force", action="store_true", help="rebuild even if OUT holds the same build")
    build.add_argument(
        "--neuroquery-dir",
        help="NeuroQuery term counts for terms.npz (implies --terms)",
    )
    # opt-in: the 1k ablation found no validation gain from terms (architecture.md), and the default build
    # must not download NeuroQuery where no local copy exists
    build.add_argument(
        "--terms",
        action="store_true",
        help="add NeuroQuery's term tf-idf (terms.npz) from --neuroquery-dir, $CBVAE_NEUROQUERY_DIR, "
        "../shared/data/neuroquery, else NiMARE's fetch_neuroquery",
    )
    build.add_argument(
        "--term-dims",
        type=int,
        default=0,
        help="entries of the text embedding fitted on the training split, the network's 'terms' condition "
        f"(with --terms; e.g. {TERMS.size}); 0, the default: terms.npz only (no validation gain measured, "
        "bundle/docs/architecture.md)",
    )
    build.add_argument(
        "--term-embedding",
        default=TERM_EMBEDDINGS[0],
        choices=TERM_EMBEDDINGS,
        help="how the text embedding is fitted on the training split: svd (the tf-idf's truncated SVD), "
        "neuroquery (NeuroQuery's SmoothedRegression of the training maps, read as their principal coordinates; "
        "the training rows cross-fitted) or neuroquery-residual (the same, fitted to the maps' residual after a "
        "ridge on topics, task and the continuous fields)",
    )
    info = sub.add_parser("info", help="check a dataset folder's files (full checksums) and print its counts")
    info.add_argument("out")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "build":
            from .builder import build_dataset
            from .neuroquery import resolve_neuroquery_dir

            terms_dir = None
            if (
                args.terms or args.neuroquery_dir
            ) and not args.no_neurosynth:  # the text joins Neurosynth studies by PubMed id
                terms_dir = resolve_neuroquery_dir(args.neuroquery_dir)
            build_dataset(
                neurosynth_dir=args.neurosynth_dir,
                out=args.out,
                subset=args.subset,
                resolution=args.resolution,
                kernel=args.kernel,
                neurostore_dirs=args.neurostore_dir,
                dtype=args.dtype,
                force=args.force,
                kernel_fwhm_mm=args.kernel_fwhm_mm,
                radius=args.radius,
                neurosynth=not args.no_neurosynth,
                seed=args.seed,
                neuroquery_dir=terms_dir,
                term_dims=args.term_dims,
                term_embedding=args.term_embedding,
            )
        else:
            from .dataset import load_dataset_info

            m = load_dataset_info(args.out, full_check=True).manifest
            keys = ("n_maps", "grid", "kernel", "counts", "split_counts", "duplicate_maps", "category_counts")
            print(json.dumps({k: m[k] for k in keys if k in m}, indent=2))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
