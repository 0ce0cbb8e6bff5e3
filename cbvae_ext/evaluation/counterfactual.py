"""Counterfactual direction: does switching a held-out study's task move its generated map the way the literature does?

For a test study of category ``c`` with posterior mean ``μ``, and each other category ``c'`` in the test
split, the generated change ``decode(μ, c') - decode(μ, c)`` (the study's other conditions kept) is
correlated with the difference of the real held-out category means ``mean(c') - mean(c)`` (the study
itself left out of ``mean(c)``), and its size is compared with that difference's (``||change|| /
||difference||``, voxel L2 in loader units). The conditional mean's own change ``E[x | c'] - E[x | c]``
is scored the same way beside it: what the conditions carry, against what the generated map carries.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cbvae_ext.evaluation.columns import COUNTERFACTUAL, MODEL, PEARSON_R, column
from cbvae_ext.evaluation.conditional import conditional_mean_probs
from cbvae_ext.evaluation.metrics import masked_vectors, pearson_r
from cbvae_ext.evaluation.section import EvalData, Section

__all__ = ["SIZE_RATIO", "counterfactual_section", "direction_scores"]

#: Metric name of the size ratio ``||change|| / ||real difference||``.
SIZE_RATIO = "size_ratio"


def direction_scores(change: np.ndarray, real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson r and size ratio of each predicted change ``[K, V]`` against the real difference ``[K, V]``.

    A change of exactly zero (a decoder that ignores the condition) has r 0 (no direction) and ratio 0.
    """
    change, real = np.asarray(change, np.float64), np.asarray(real, np.float64)
    r = np.nan_to_num(pearson_r(change, real), nan=0.0)
    size = np.linalg.norm(change, axis=1) / np.maximum(np.linalg.norm(real, axis=1), 1e-12)
    return r, size


def _median(values: list[float]) -> float | None:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.median(finite)) if finite else None


@torch.no_grad()
def counterfactual_section(data: EvalData) -> Section:
    """Generated and conditional-mean changes for switched tasks, per category pair and per study.

    Reads ``data.cache["counterfactual"]`` (``{"model", "mu", "imputed_defaults", "task"}``, written by the
    workflow for the C-β-VAE run); studies per category are capped at ``opts["n_counterfactual"]`` (seeded).
    """
    ctx = data.cache.get("counterfactual")
    if ctx is None:
        return Section("counterfactual", {"absent": "no --run_dir given"})
    model, mu, imp0, task = ctx["model"], ctx["mu"], ctx["imputed_defaults"], ctx["task"]
    te, device = data.test, data.device
    if task is None:
        return Section("counterfactual", {"absent": "the run's schema has no task group"})
    counts = {c: int((te.categories == c).sum()) for c in np.unique(te.categories) if c >= 0}
    present = sorted(counts)
    # the study's own category mean leaves it out, so that category needs another test map
    sources = [c for c in present if counts[c] >= 2]
    if len(present) < 2:
        return Section("counterfactual", {"absent": "fewer than two task categories in the test split"})
    if not sources:
        return Section(
            "counterfactual",
            {"absent": "no task category has two test maps (a study is left out of its own category's held-out mean)"},
        )
    cap = data.opts.get("n_counterfactual")
    rng = data.rng(23)
    sums = {c: te.maps[te.categories == c].sum(axis=0, dtype=np.float64) for c in present}
    names = data.schema.categories
    per_pair: dict[tuple[int, int], dict[str, list[float]]] = {}
    per_map = {k: np.full(te.n, np.nan) for k in ("gen_r", "gen_size", "cm_r", "cm_size")}
    n_studies = 0
    for c in sources:
        rows = np.flatnonzero(te.categories == c)
        if cap is not None and len(rows) > cap:
            rows = np.sort(rng.choice(rows, int(cap), replace=False))
        targets = [t for t in present if t != c]
        for i in rows:
            n_studies += 1
            meta = np.repeat(te.meta[i : i + 1], len(targets) + 1, axis=0)
            meta_mask = np.repeat(te.meta_mask[i : i + 1], len(targets) + 1, axis=0)
            meta[1:, task.meta_slice] = 0.0
            meta[np.arange(1, len(targets) + 1), task.meta_slice.start + np.array(targets)] = 1.0
            meta_mask[:, task.mask_index] = 1.0
            m_t, mask_t = torch.from_numpy(meta).to(device), torch.from_numpy(meta_mask).to(device)
            fill = None if imp0 is None else imp0.to(device).expand(len(meta), -1)
            m = model.decoder_input(m_t, mask_t, fill)
            z = torch.from_numpy(np.repeat(mu[i : i + 1], len(meta), axis=0)).to(device)
            gen = masked_vectors(torch.sigmoid(model.decode(z, m).float()).cpu().numpy(), data.mask)
            cm, _ = conditional_mean_probs(model, m, data.opts["n_prior_samples"], data.generator(29 + int(i)))
            cm = masked_vectors(cm.cpu().numpy(), data.mask)
            own = (sums[c] - te.maps[i]) / (counts[c] - 1)
            real = np.stack([sums[t] / counts[t] - own for t in targets])
            g_r, g_s = direction_scores(gen[1:] - gen[:1], real)
            c_r, c_s = direction_scores(cm[1:] - cm[:1], real)
            for k, t in enumerate(targets):
                cell = per_pair.setdefault((c, t), {"gen_r": [], "gen_size": [], "cm_r": [], "cm_size": []})
                for key, arr in (("gen_r", g_r), ("gen_size", g_s), ("cm_r", c_r), ("cm_size", c_s)):
                    cell[key].append(float(arr[k]))
            for key, arr in (("gen_r", g_r), ("gen_size", g_s), ("cm_r", c_r), ("cm_size", c_s)):
                per_map[key][i] = float(np.median(arr))
    pairs = {
        f"{names[c]} -> {names[t]}": {
            "n_studies": len(v["gen_r"]),
            "generated_median_r": _median(v["gen_r"]),
            "generated_median_size_ratio": _median(v["gen_size"]),
            "conditional_mean_median_r": _median(v["cm_r"]),
            "conditional_mean_median_size_ratio": _median(v["cm_size"]),
        }
        for (c, t), v in per_pair.items()
    }
    every = {k: [x for v in per_pair.values() for x in v[k]] for k in ("gen_r", "gen_size", "cm_r", "cm_size")}
    gen_col, cm_col = column(MODEL, COUNTERFACTUAL), column(MODEL, f"{COUNTERFACTUAL}_cond_mean")
    columns = {
        f"{gen_col}/{PEARSON_R}": per_map["gen_r"],
        f"{gen_col}/{SIZE_RATIO}": per_map["gen_size"],
        f"{cm_col}/{PEARSON_R}": per_map["cm_r"],
        f"{cm_col}/{SIZE_RATIO}": per_map["cm_size"],
    }
    results: dict[str, Any] = {
        "rule": "decode(μ, c') - decode(μ, c) for held-out studies of category c, every other test category c', "
        "against mean(c') - mean(c) of the held-out maps (the study left out of mean(c)); r = Pearson r, "
        "size ratio = ||change|| / ||difference||; the conditional mean's change E[x|c'] - E[x|c] beside it",
        "n_studies": n_studies,
        "n_changes": len(every["gen_r"]),
        "generated": {"median_r": _median(every["gen_r"]), "median_size_ratio": _median(every["gen_size"])},
        "conditional_mean": {"median_r": _median(every["cm_r"]), "median_size_ratio": _median(every["cm_size"])},
        "per_study_median_r": {
            "generated": data.summary(per_map["gen_r"]),
            "conditional_mean": data.summary(per_map["cm_r"]),
            "generated_vs_conditional_mean": data.paired(per_map["gen_r"], per_map["cm_r"]),
        },
        "pairs": pairs,
    }
    return Section("counterfactual", results, columns)
