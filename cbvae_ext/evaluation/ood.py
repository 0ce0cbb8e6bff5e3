"""Out-of-distribution maps (``ood`` section): the C-β-VAE on a dataset built from NeuroStore studysets only.

Reconstruction, the conditional-only map against the training category means, and the sample-size
imputation on maps the model never saw the source of; the per-map values go to ``per_map_ood.parquet``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cbvae_ext.evaluation.baselines import MeanMapBaseline
from cbvae_ext.evaluation.columns import CATEGORY_MEAN, MEAN_MAP, MODEL, MODEL_COND, PEAK_AUC, PEARSON_R, column
from cbvae_ext.evaluation.imputation import imputation_scores
from cbvae_ext.evaluation.metrics import peak_auc, score_maps
from cbvae_ext.evaluation.passes import imputed_raw, load_split, peak_indicator, score_network
from cbvae_ext.evaluation.runs import EvaluationError, pass_options
from cbvae_ext.evaluation.section import EvalData, Section, prefixed

__all__ = ["OOD_TABLE", "ood_section"]

#: The file of the out-of-distribution per-map table.
OOD_TABLE = "per_map_ood.parquet"


def ood_section(data: EvalData, path: str | Path | None = None) -> Section:
    """Reconstruction, conditional generation and sample-size imputation on the dataset at ``path``.

    Reads ``data.cache["category_mean"]`` (``baselines_section``); option ``ood_max_maps`` (a seeded subsample of
    the studyset's maps; None: all). The
    workflow passes ``path`` (``--ood_dataset_dir``) with ``functools.partial``.

    Raises:
        EvaluationError: a dataset on another grid, mask or kernel.
    """
    if path is None:
        return Section(
            "ood",
            {
                "absent": "no --ood_dataset_dir given; build one with python -m cbvae_ext.data build --no-neurosynth "
                "--neurostore-dir <nimare>/resources/nback_vs_flanker_studyset_2026-07 --out OOD"
            },
        )
    if MODEL not in data.runs:
        return Section("ood", {"absent": "no --run_dir given"})
    from cbvae_ext.data import load_dataset_info  # the loader pulls in NiMARE: import on use

    ood = load_dataset_info(path)
    if ood.mask.shape != data.mask.shape or not np.array_equal(ood.mask, data.mask):
        raise EvaluationError(f"--ood_dataset_dir {path} has another grid or mask; build it with the same options")
    if ood.manifest.get("kernel") != data.info.manifest.get("kernel"):
        raise EvaluationError(f"--ood_dataset_dir {path} was built with another kernel; build it with the same one")
    rows = ood.rows("all")
    cap = data.opts.get("ood_max_maps")
    n_studyset = len(rows)
    if cap is not None and len(rows) > cap:
        rows = np.sort(data.rng("ood_rows").choice(rows, int(cap), replace=False))
    maps = load_split(ood, rows, schema=data.schema)
    peaks, _ = peak_indicator(ood, maps.maps)
    run = data.runs[MODEL]
    options = pass_options(run, data.opts["n_prior_samples"], conditional=True)
    sc = score_network(
        run.model, maps, data.mask, peaks, options, data.opts["batch_size"], data.device, data.generator("ood")
    )
    cols: dict[str, Any] = {"id": maps.ids, "category": list(maps.frame["category"]), **prefixed(MODEL, sc["columns"])}
    baselines = {
        CATEGORY_MEAN: data.cache["category_mean"].predict(maps.categories),
        MEAN_MAP: MeanMapBaseline().fit(data.train.maps).predict(maps.n),
    }
    for name, pred in baselines.items():
        scores = score_maps(pred, maps.maps, data.mask)
        if peaks is not None:
            scores[PEAK_AUC] = peak_auc(pred, peaks)
        cols.update(prefixed(name, scores))
    out: dict[str, Any] = {
        "dataset_dir": str(path),
        "n_maps": maps.n,
        "n_maps_in_studyset": n_studyset,
        "sources": sorted(set(maps.frame["source"])),
        "categories": {str(k): int(v) for k, v in maps.frame["category"].value_counts().items()},
        MODEL: data.summaries(cols, MODEL),
        CATEGORY_MEAN: data.summaries(cols, CATEGORY_MEAN),
        "cond_only_r_vs_category_mean": data.paired(
            cols[column(MODEL_COND, PEARSON_R)], cols[column(CATEGORY_MEAN, PEARSON_R)]
        ),
    }
    section = Section("ood", out, tables={OOD_TABLE: cols})
    imp = sc["imp_mu"]
    if imp is None:
        out["sample_size_imputation"] = {"absent": "this network has no imputation head"}
        return section
    true = maps.frame["sample_size"].to_numpy(np.float64)
    train_ss = data.train.frame["sample_size"].to_numpy(np.float64)
    train_ss = train_ss[np.isfinite(train_ss)]
    # Neurosynth records no sample sizes: then the reference predictor is the studyset's own median,
    # an oracle the model cannot know (it only makes the comparison harder for the model)
    reference, source = (
        (float(np.median(train_ss)), "training median")
        if train_ss.size
        else (float(np.nanmedian(true)), "median of the studyset itself (no training map has a sample size)")
    )
    imputed = imputed_raw(imp, data.schema)["sample_size"]
    out["sample_size_imputation"] = {**imputation_scores(imputed, true, reference), "reference": source}
    return section
