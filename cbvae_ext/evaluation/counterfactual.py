"""Counterfactual direction: does switching a held-out study's task move its generated map the way the literature does?

For a test study of category ``c`` with posterior mean ``μ``, and each other category ``c'`` in the test
split, the generated change ``decode(μ, c') - decode(μ, c)`` (the study's other conditions kept) is
correlated with the difference of the real held-out category means ``mean(c') - mean(c)`` (the study
itself left out of ``mean(c)``), and its size is compared with that difference's (``||change|| /
||difference||``, voxel L2 in loader units). The conditional mean's own change ``E[x | c'] - E[x | c]``
is scored the same way beside it: what the conditions carry, against what the generated map carries.

Two references make the numbers readable. The training category means' difference ``train(c') - train(c)``
scored against the same held-out difference is what the literature itself predicts: with a few held-out
maps per category the target is noisy, and no predictor is expected far above this reference. And each
change is also correlated with that training difference directly (a target without held-out noise): does
the generated map move the way the training studies say it should?
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cbvae_ext.evaluation.columns import COUNTERFACTUAL, MODEL, PEARSON_R, column
from cbvae_ext.evaluation.conditional import conditional_mean_probs
from cbvae_ext.evaluation.criteria import floor_criterion
from cbvae_ext.evaluation.metrics import masked_vectors, pearson_r
from cbvae_ext.evaluation.section import EvalData, Section

__all__ = ["DIRECTION_GOAL", "SIZE_RATIO", "counterfactual_section", "direction_scores"]

#: The issue's goal for the median r of the generated change (against the held-out and the training difference).
DIRECTION_GOAL = 0.5

#: Metric name of the size ratio ``||change|| / ||real difference||``.
SIZE_RATIO = "size_ratio"


#: Scores kept per switch: ``<who>_r`` / ``<who>_size`` for the generated change (gen), the conditional mean's
#: (cm), the training category means' (tm) against the held-out difference, and gen / cm against the training
#: difference (``_lit``).
_SCORES = tuple(f"{who}_{m}" for who in ("gen", "cm", "tm", "gen_lit", "cm_lit") for m in ("r", "size"))


def direction_scores(change: np.ndarray, real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson r and size ratio of each predicted change ``[K, V]`` against the real difference ``[K, V]``.

    A change of exactly zero (a decoder that ignores the condition) has r 0 (no direction) and ratio 0; a
    target that is not finite (a category without training maps) gives NaN.
    """
    change, real = np.asarray(change, np.float64), np.asarray(real, np.float64)
    r = np.nan_to_num(pearson_r(change, real), nan=0.0)
    size = np.linalg.norm(change, axis=1) / np.maximum(np.linalg.norm(real, axis=1), 1e-12)
    unknown = ~np.isfinite(real).all(axis=1)
    r[unknown], size[unknown] = np.nan, np.nan
    return r, size


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


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
    # the literature's answer: training category means (NaN for a category with no training map)
    train_means = {
        c: tr.mean(axis=0, dtype=np.float64) if len(tr) else np.full(te.maps.shape[1], np.nan)
        for c in present
        for tr in [data.train.maps[data.train.categories == c]]
    }
    names = data.schema.categories
    per_pair: dict[tuple[int, int], dict[str, list[float]]] = {}
    per_map = {k: np.full(te.n, np.nan) for k in _SCORES}
    n_studies = 0
    for c in sources:
        rows = np.flatnonzero(te.categories == c)
        if cap is not None and len(rows) > cap:
            rows = np.sort(rng.choice(rows, int(cap), replace=False))
        targets = [t for t in present if t != c]
        literature = np.stack([train_means[t] - train_means[c] for t in targets])
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
            scores = {}
            for key, change, target in (
                ("gen", gen[1:] - gen[:1], real),
                ("cm", cm[1:] - cm[:1], real),
                ("tm", literature, real),
                ("gen_lit", gen[1:] - gen[:1], literature),
                ("cm_lit", cm[1:] - cm[:1], literature),
            ):
                scores[f"{key}_r"], scores[f"{key}_size"] = direction_scores(change, target)
            for k, t in enumerate(targets):
                cell = per_pair.setdefault((c, t), {key: [] for key in _SCORES})
                for key in _SCORES:
                    cell[key].append(float(scores[key][k]))
            for key in _SCORES:
                value = _median(scores[key].tolist())
                per_map[key][i] = np.nan if value is None else value
    pairs = {
        f"{names[c]} -> {names[t]}": {
            "n_studies": len(v["gen_r"]),
            "generated_median_r": _median(v["gen_r"]),
            "generated_median_size_ratio": _median(v["gen_size"]),
            "conditional_mean_median_r": _median(v["cm_r"]),
            "conditional_mean_median_size_ratio": _median(v["cm_size"]),
            "training_category_means_median_r": _median(v["tm_r"]),
        }
        for (c, t), v in per_pair.items()
    }
    every = {k: [x for v in per_pair.values() for x in v[k]] for k in _SCORES}
    gen_col, cm_col = column(MODEL, COUNTERFACTUAL), column(MODEL, f"{COUNTERFACTUAL}_cond_mean")
    columns = {
        f"{gen_col}/{PEARSON_R}": per_map["gen_r"],
        f"{gen_col}/{SIZE_RATIO}": per_map["gen_size"],
        f"{cm_col}/{PEARSON_R}": per_map["cm_r"],
        f"{cm_col}/{SIZE_RATIO}": per_map["cm_size"],
    }

    def scored(key: str) -> dict[str, float | None]:
        return {"median_r": _median(every[f"{key}_r"]), "median_size_ratio": _median(every[f"{key}_size"])}

    results: dict[str, Any] = {
        "rule": "decode(μ, c') - decode(μ, c) for held-out studies of category c, every other test category c', "
        "against mean(c') - mean(c) of the held-out maps (the study left out of mean(c)); r = Pearson r, "
        "size ratio = ||change|| / ||difference||; the conditional mean's change E[x|c'] - E[x|c] beside it, "
        "and the training category means' difference train(c') - train(c) as the literature's reference",
        "n_studies": n_studies,
        "n_changes": len(every["gen_r"]),
        "generated": scored("gen"),
        "conditional_mean": scored("cm"),
        "training_category_means": scored("tm"),
        "against_training_means": {
            "rule": "the same changes correlated with train(c') - train(c) (a target without held-out noise)",
            "generated": scored("gen_lit"),
            "conditional_mean": scored("cm_lit"),
        },
        "per_study_median_r": {
            "generated": data.summary(per_map["gen_r"]),
            "conditional_mean": data.summary(per_map["cm_r"]),
            "training_category_means": data.summary(per_map["tm_r"]),
            "generated_vs_conditional_mean": data.paired(per_map["gen_r"], per_map["cm_r"]),
            "generated_vs_training_category_means": data.paired(per_map["gen_r"], per_map["tm_r"]),
        },
        "pairs": pairs,
    }
    reference = results["training_category_means"]["median_r"]
    results["criteria"] = {
        "counterfactual_direction": floor_criterion(
            results["generated"]["median_r"],
            DIRECTION_GOAL,
            f"median r of the generated change with the held-out mean difference >= {DIRECTION_GOAL} (the "
            f"training category means' own difference reaches {_num(reference)}: the held-out means' noise "
            "caps every predictor)",
            None,
        ),
        "counterfactual_toward_training_means": floor_criterion(
            results["against_training_means"]["generated"]["median_r"],
            DIRECTION_GOAL,
            f"median r of the generated change with the training category means' difference >= {DIRECTION_GOAL}",
            None,
        ),
    }
    return Section("counterfactual", results, columns)
