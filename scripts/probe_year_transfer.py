"""Year probes on μ of small-scale runs, fitted and scored on the maps of a larger build: a de-biasing pilot.

On the 1k subset the evaluation's year probes see 100 test maps, too few to tell two networks apart. This
script encodes maps of a larger build (full v7) that are outside the runs' own dataset with each run's
encoder, fits the evaluation's probes (``probes.year_probes``: logistic and MLP over year bins) on its
training-split maps and scores them on its test-split maps, then pairs every run with the twin
(``--twin``, the λ = 0 run) map by map (``stats.paired_bootstrap`` of the balanced-accuracy terms). The
runs' conditions are encoded with the schema of the dataset they were trained on.

Usage::

    python scripts/probe_year_transfer.py --runs-dataset DATA_1K --probe-dataset DATA_ALL \
        --run twin=RUN_A --run z1=RUN_B [--run ...] --twin twin [--n-train 8000]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from cbvae_ext.data import load_dataset_info
from cbvae_ext.evaluation.passes import encode_split, load_split
from cbvae_ext.evaluation.probes import year_probes
from cbvae_ext.evaluation.stats import balanced_accuracy_terms, paired_bootstrap
from cbvae_ext.run_folder import RunFolder


def _outside(info, rows: np.ndarray, excluded: set[str]) -> np.ndarray:
    ids = info.metadata["id"].astype(str).to_numpy()
    return rows[~np.isin(ids[rows], list(excluded))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-dataset", required=True, help="dataset folder the runs were trained on")
    ap.add_argument("--probe-dataset", required=True, help="larger build whose maps the probes read")
    ap.add_argument("--run", action="append", required=True, metavar="NAME=DIR", help="a run folder (repeat)")
    ap.add_argument("--twin", required=True, help="NAME of the run every other one is paired with")
    ap.add_argument("--n-train", type=int, default=8000, help="training-split maps the probes are fitted on")
    ap.add_argument("--n-permutations", type=int, default=5, help="permutations of the logistic probe's null")
    ap.add_argument("--n-permutations-mlp", type=int, default=2, help="permutations of the MLP probe's null")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    bad = [r for r in args.run if "=" not in r]
    if bad:
        ap.error(f"--run {bad[0]!r}: give NAME=DIR")
    runs = dict(r.split("=", 1) for r in args.run)
    if args.twin not in runs:
        ap.error(f"--twin {args.twin!r} is not one of the --run names ({', '.join(runs)})")

    own, probe = load_dataset_info(args.runs_dataset), load_dataset_info(args.probe_dataset)
    mask = np.asarray(own.mask) != 0
    if mask.shape != np.asarray(probe.mask).shape or not (mask == (np.asarray(probe.mask) != 0)).all():
        ap.error("--runs-dataset and --probe-dataset have different brain masks; build both on the same grid")
    excluded = set(own.metadata["id"].astype(str))
    rng = np.random.default_rng(args.seed)
    train_rows = _outside(probe, probe.rows("train"), excluded)
    train_rows = np.sort(rng.choice(train_rows, min(args.n_train, len(train_rows)), replace=False))
    train = load_split(probe, train_rows, schema=own.schema)
    test = load_split(probe, _outside(probe, probe.rows("test"), excluded), schema=own.schema)
    dated = test.year_bin >= 0
    print(f"probes fitted on {train.n} training-split maps, scored on {int(dated.sum())} dated test-split maps")

    terms: dict[str, dict[str, np.ndarray]] = {}
    for name, path in runs.items():
        model = RunFolder.open(path).load_network("cpu").to(memory_format=torch.channels_last_3d).eval()
        with torch.no_grad():
            mu_train, mu_test = (encode_split(model, d, mask, 64, "cpu") for d in (train, test))
        res = year_probes(
            mu_train, train.year_bin, mu_test, test.year_bin, args.n_permutations, args.n_permutations_mlp, args.seed
        )
        terms[name] = {k: balanced_accuracy_terms(test.year_bin[dated], r["predictions"]) for k, r in res.items()}

    print("| run | logistic | MLP | logistic − twin [95% CI] | MLP − twin [95% CI] |\n| --- | --- | --- | --- | --- |")
    for name, t in terms.items():
        cells = [f"{t[k].mean():.3f}" for k in ("logistic", "mlp")]
        for k in ("logistic", "mlp"):
            if name == args.twin:
                cells.append("—")
                continue
            p = paired_bootstrap(t[k], terms[args.twin][k], "less", 2000, args.seed)
            cells.append(f"{p['mean_diff']:+.3f} [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
