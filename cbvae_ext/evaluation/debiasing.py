"""De-biasing: how much publication year is left in the latent codes (``debiasing`` section).

Year probes (``probes.year_probes``: logistic and MLP over year bins, each with a permutation null) are fitted
on the training μ of the C-β-VAE, of its λ = 0 twin and of the data ceiling (the PCA codes of the maps with L
components) and scored on the test μ; their per-map balanced-accuracy terms pair the model with its twin.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm.auto import tqdm

from cbvae_ext.evaluation.columns import DATA_CEILING, MODEL, NOLAMBDA, PEARSON_R, column, probe, recon
from cbvae_ext.evaluation.passes import encode_split
from cbvae_ext.evaluation.probes import year_probes, year_r2
from cbvae_ext.evaluation.runs import ROLES
from cbvae_ext.evaluation.section import EvalData, Section
from cbvae_ext.evaluation.stats import balanced_accuracy_terms

__all__ = ["PROBES", "debiasing_section"]

#: The post-hoc year probes paired between the model and its λ = 0 twin.
PROBES = ("logistic", "mlp")


def debiasing_section(data: EvalData) -> Section:
    """Year probes on μ of the model, its λ = 0 twin and the data ceiling (PCA-L codes), paired on test maps.

    Reads ``data.cache["scores"]`` (the test μ of each run, ``models_section``), ``data.cache["pca"]``
    (``baselines_section``) and the ``recon`` columns; writes the ``<codes>/probe_<probe>`` columns.
    """
    tr, te, opts = data.train, data.test, data.opts
    pca, scores = data.cache["pca"], data.cache.get("scores", {})
    codes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for role in (MODEL, NOLAMBDA):
        if role in data.runs:
            with tqdm(total=1, desc=f"train μ, {ROLES[role].label}", leave=False, disable=None):
                mu_train = encode_split(data.runs[role].model, tr, data.mask, opts["batch_size"], data.device)
            codes[role] = (mu_train, scores[role]["mu"])
    codes[DATA_CEILING] = (pca.transform(tr.maps, data.latent_size), pca.transform(te.maps, data.latent_size))
    years_tr = tr.frame["year"].to_numpy(np.float64)
    years_te = te.frame["year"].to_numpy(np.float64)
    dated = te.year_bin >= 0
    columns: dict[str, np.ndarray] = {}
    out: dict[str, Any] = {"probes": {}, "year_r2": {}}
    for name, (c_tr, c_te) in codes.items():
        res = year_probes(
            c_tr,
            tr.year_bin,
            c_te,
            te.year_bin,
            n_permutations=opts["n_permutations"],
            n_permutations_mlp=opts["n_permutations_mlp"],
            seed=opts["seed"],
        )
        for kind, r in res.items():
            if isinstance(r, dict) and "predictions" in r:
                terms = np.full(te.n, np.nan)
                terms[dated] = balanced_accuracy_terms(te.year_bin[dated], r.pop("predictions"))
                columns[column(name, probe(kind))] = terms
        out["probes"][name] = res
        out["year_r2"][name] = year_r2(c_tr, years_tr, c_te, years_te)
    out["data_ceiling_codes"] = f"PCA with {data.latent_size} components of the raw maps (fit on train)"
    if MODEL in codes and NOLAMBDA in codes:
        out["paired_vs_nolambda"] = {
            kind: data.paired(columns[column(MODEL, probe(kind))], columns[column(NOLAMBDA, probe(kind))], "less")
            for kind in PROBES
            if column(MODEL, probe(kind)) in columns
        }
        cols = data.cache["columns"]
        out["reconstruction_cost"] = {
            "rule": "paired r of the λ > 0 model minus its λ = 0 twin (negative = de-biasing costs reconstruction)",
            **data.paired(cols[recon(MODEL, PEARSON_R)], cols[recon(NOLAMBDA, PEARSON_R)]),
        }
    else:
        out["paired_vs_nolambda"] = {"absent": "no --nolambda_run_dir given"}
    return Section("debiasing", out, columns)
