"""The pass/fail rules of ``test_results.json``, each computed from the per-map table.

A paired criterion compares two columns of the per-map table on the same maps (``stats.paired_bootstrap``)
and passes only when the 95% CI of the mean difference lies on the claimed side of 0 (or of ``-margin``).
A criterion whose columns are absent (a run, the topic weights or the dataset's NeuroQuery text not given) is
``passed: null`` with the reason. Anyone can recompute every criterion from ``per_map_test.parquet``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cbvae_ext.evaluation.columns import (
    BASELINE,
    CATEGORY_MEAN,
    COMPLETION_AUC,
    DICE_TOP1,
    HALF_MAP,
    JOINT_PEAK_LOGLIK,
    LOGLIK,
    LOGLIK_IWAE,
    MEAN_MAP,
    MODEL,
    MODEL_COND,
    NEUROQUERY,
    NOLAMBDA,
    PCA_COMPLETION,
    PEAK_AUC,
    PEARSON_R,
    TOPIC_RIDGE,
    UNCOND,
    column,
    hidden,
    pca,
    probe,
    recon,
)
from cbvae_ext.evaluation.stats import paired_bootstrap

__all__ = [
    "PAIRED_CRITERIA",
    "PairedRule",
    "count_criterion",
    "evaluate_criteria",
    "floor_criterion",
    "section_criteria",
    "threshold_criterion",
]


@dataclass(frozen=True)
class PairedRule:
    """``a`` beats ``b`` on the same maps in ``direction`` (``"greater"``/``"less"``), beyond ``-margin``."""

    name: str
    a: str
    b: str
    direction: str
    rule: str
    margin: float = 0.0


def _rules(latent_size: int) -> tuple[PairedRule, ...]:
    pca_l, pca_2l = pca(latent_size), pca(2 * latent_size)
    return (
        PairedRule(
            "r_above_pca",
            recon(MODEL, PEARSON_R),
            column(pca_l, PEARSON_R),
            "greater",
            f"C-β-VAE reconstruction r > PCA with the latent size ({latent_size}) in components",
        ),
        PairedRule(
            "r_above_pca_2L",
            recon(MODEL, PEARSON_R),
            column(pca_2l, PEARSON_R),
            "greater",
            f"C-β-VAE reconstruction r > PCA with twice the latent size ({2 * latent_size})",
        ),
        PairedRule(
            "dice_top1_above_pca",
            recon(MODEL, DICE_TOP1),
            column(pca_l, DICE_TOP1),
            "greater",
            f"C-β-VAE reconstruction top-1% Dice > PCA with {latent_size} components",
        ),
        PairedRule(
            "iwae_above_category_mean",
            column(MODEL, LOGLIK_IWAE),
            column(CATEGORY_MEAN, LOGLIK),
            "greater",
            "conditional bounds: C-β-VAE IWAE log p(x | m) > the category-mean model's log p(x | category)",
        ),
        PairedRule(
            "baseline_iwae_above_mean_map",
            column(BASELINE, LOGLIK_IWAE),
            column(MEAN_MAP, LOGLIK),
            "greater",
            "unconditional bounds: ResNet-10 baseline VAE IWAE log p(x) > the mean-map model's log p(x)",
        ),
        PairedRule(
            "uncond_iwae_above_mean_map",
            column(UNCOND, LOGLIK_IWAE),
            column(MEAN_MAP, LOGLIK),
            "greater",
            "unconditional bounds: conditioning-off twin IWAE log p(x) > the mean-map model's log p(x)",
        ),
        PairedRule(
            "conditioning_gain",
            column(MODEL, LOGLIK_IWAE),
            column(UNCOND, LOGLIK_IWAE),
            "greater",
            "IWAE log p(x | m) of the C-β-VAE > log p(x) of its conditioning-off twin (conditions carry information)",
        ),
        PairedRule(
            "cond_only_r_above_category_mean",
            column(MODEL_COND, PEARSON_R),
            column(CATEGORY_MEAN, PEARSON_R),
            "greater",
            "conditional-only map r > the training category mean map's r",
        ),
        PairedRule(
            "cond_only_r_above_topic_ridge",
            column(MODEL_COND, PEARSON_R),
            column(TOPIC_RIDGE, PEARSON_R),
            "greater",
            "conditional-only map r > a ridge on the 50 LDA topic weights",
        ),
        PairedRule(
            "peak_auc_above_category_mean",
            column(MODEL_COND, PEAK_AUC),
            column(CATEGORY_MEAN, PEAK_AUC),
            "greater",
            "NeuroQuery protocol: conditional map ranks the study's peak voxels higher (AUC) than the category mean",
        ),
        PairedRule(
            "peak_auc_above_neuroquery",
            column(MODEL_COND, PEAK_AUC),
            column(NEUROQUERY, PEAK_AUC),
            "greater",
            "conditional-only map peak AUC > NeuroQuery's (fitted on the training studies with text), paired on the "
            "test studies with text",
        ),
        PairedRule(
            "cond_only_r_above_neuroquery",
            column(MODEL_COND, PEARSON_R),
            column(NEUROQUERY, PEARSON_R),
            "greater",
            "conditional-only map r > NeuroQuery's, paired on the test studies with text",
        ),
        PairedRule(
            "completion_auc_above_conditions",
            column(MODEL, COMPLETION_AUC),
            column(MODEL_COND, COMPLETION_AUC),
            "greater",
            "completion from half of a study's peaks: AUC of the other half above the conditional-only map's",
        ),
        PairedRule(
            "completion_auc_above_half",
            column(MODEL, COMPLETION_AUC),
            column(HALF_MAP, COMPLETION_AUC),
            "greater",
            "completion from half of a study's peaks: AUC of the other half above the given half's own MA map",
        ),
        PairedRule(
            "completion_auc_above_pca",
            column(MODEL, COMPLETION_AUC),
            column(PCA_COMPLETION, COMPLETION_AUC),
            "greater",
            f"completion from half of a study's peaks: AUC above the half's map projected on PCA-{latent_size} (train)",
        ),
        PairedRule(
            "joint_likelihood_above_cond_mean",
            column(MODEL, JOINT_PEAK_LOGLIK),
            column(MODEL_COND, JOINT_PEAK_LOGLIK),
            "greater",
            "log p(all peak voxels | conditions), z integrated out (peaks co-vary), above the conditional mean "
            "density's (peaks independent), nats per study",
        ),
        PairedRule(
            "all_hidden_within_0.03",
            column(column(MODEL, hidden("all")), PEARSON_R),
            recon(MODEL, PEARSON_R),
            "greater",
            "reconstruction r with every condition hidden > r with them given - 0.03",
            margin=0.03,
        ),
        PairedRule(
            "logistic_probe_below_nolambda",
            column(MODEL, probe("logistic")),
            column(NOLAMBDA, probe("logistic")),
            "less",
            "post-hoc logistic year probe on μ: balanced accuracy below the λ = 0 twin's",
        ),
        PairedRule(
            "mlp_probe_below_nolambda",
            column(MODEL, probe("mlp")),
            column(NOLAMBDA, probe("mlp")),
            "less",
            "post-hoc MLP year probe on μ: balanced accuracy below the λ = 0 twin's",
        ),
    )


#: The rule names, in report order (for the docs and tests).
PAIRED_CRITERIA = tuple(r.name for r in _rules(1))


def _absent(rule: str, reason: str) -> dict[str, Any]:
    return {"rule": rule, "passed": None, "reason": reason}


def evaluate_criteria(
    table: pd.DataFrame, latent_size: int, n_bootstrap: int, seed: int, absent: dict[str, str] | None = None
) -> dict[str, Any]:
    """Every paired criterion on the per-map table.

    Args:
        table: the per-map test table (one row per test map).
        latent_size: the C-β-VAE's latent size (picks the PCA columns).
        n_bootstrap: resamples of each paired bootstrap.
        seed: seed of the resampling.
        absent: reason per missing column or method prefix (``"uncond"``, ``"topic_ridge"``, ...); a known reason
            is preferred over "no column".

    Returns:
        name -> ``{rule, a, b, passed, reason, ...paired_bootstrap}``.
    """
    absent = absent or {}
    out: dict[str, Any] = {}
    for r in _rules(latent_size):
        missing = [c for c in (r.a, r.b) if c not in table.columns]
        if missing:
            known = [absent.get(c, absent.get(c.split("/", 1)[0])) for c in missing]
            reason = next((k for k in known if k), f"no column {missing[0]!r} in the per-map table")
            out[r.name] = _absent(r.rule, reason)
            continue
        a, b = table[r.a].to_numpy(np.float64), table[r.b].to_numpy(np.float64)
        res = paired_bootstrap(a, b, r.direction, n_bootstrap, seed, r.margin)
        reason = None if res["passed"] is not None else "no map where both values are defined"
        out[r.name] = {"rule": r.rule, "a": r.a, "b": r.b, **res, "reason": reason}
    return out


def threshold_criterion(value: float | None, threshold: float, rule: str, reason: str | None) -> dict[str, Any]:
    """A value at or below a fixed threshold (the adversary's balanced accuracy at chance)."""
    if value is None:
        return _absent(rule, reason or "no value")
    return {"rule": rule, "value": value, "reference": threshold, "passed": bool(value <= threshold), "reason": None}


def floor_criterion(value: float | None, floor: float, rule: str, reason: str | None) -> dict[str, Any]:
    """A value at or above a fixed goal (the counterfactual direction's median r)."""
    if value is None:
        return _absent(rule, reason or "no value")
    return {"rule": rule, "value": value, "reference": floor, "passed": bool(value >= floor), "reason": None}


def count_criterion(value: int | None, reference: int | None, rule: str, reason: str | None) -> dict[str, Any]:
    """A count at least as high as a reference count (category identification)."""
    if value is None or reference is None:
        return _absent(rule, reason or "no value")
    return {"rule": rule, "value": int(value), "reference": int(reference), "passed": bool(value >= reference)}


def section_criteria(results: dict[str, Any]) -> dict[str, Any]:
    """The criteria sections computed themselves: the ``criteria`` entry of every section's results (a section
    that is absent has none)."""
    out: dict[str, Any] = {}
    for res in results.values():
        if isinstance(res, dict) and "absent" not in res:
            out.update(res.get("criteria") or {})
    return out
