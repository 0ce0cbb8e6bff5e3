"""Names of the per-map test table's columns written by the text baseline and the field's protocols.

A column is ``<predictor>/<metric>``; the sections that write these columns and ``criteria.py`` that reads
them both take the names from here, so a rename is one edit.
"""

from __future__ import annotations

__all__ = [
    "CALIBRATION_BRIER",
    "CATEGORY_MEAN",
    "COMPLETION_AUC",
    "COMPLETION_R",
    "COUNTERFACTUAL",
    "HALF_MAP",
    "JOINT_PEAK_LOGLIK",
    "JOINT_PEAK_LOGLIK_PRIOR",
    "MEAN_MAP",
    "MITCHELL",
    "MODEL",
    "MODEL_COND",
    "NEUROQUERY",
    "PEAK_AUC",
    "PEAK_LOGLIK",
    "PCA_COMPLETION",
    "PEAK_RATE",
    "PEARSON_R",
    "PROTOCOL_PREDICTORS",
    "TITLE",
    "TOPIC_RIDGE",
    "column",
]

#: Predictors (column prefixes).
MODEL = "cbvae"  # the C-β-VAE itself (its completion, sampled maps)
MODEL_COND = "cbvae/cond"  # the C-β-VAE's conditional-only map
CATEGORY_MEAN = "category_mean"
MEAN_MAP = "mean_map"
TOPIC_RIDGE = "topic_ridge"
NEUROQUERY = "neuroquery"
HALF_MAP = "half_map"  # completion: the first half's own MA map
PCA_COMPLETION = "pca_completion"  # completion: the first half's map projected on the training PCA (L components)
PEAK_RATE = "peak_rate"  # calibration: the training split's rate of the event per voxel
#: Every predictor the protocols score, in report order.
PROTOCOL_PREDICTORS = (MODEL_COND, NEUROQUERY, CATEGORY_MEAN, TOPIC_RIDGE, MEAN_MAP)

#: Metrics (column suffixes).
PEARSON_R = "pearson_r"
PEAK_AUC = "peak_auc"
PEAK_LOGLIK = "peak_loglik"  # NeuroQuery's held-out peak log-likelihood, minus the training mean density's
MITCHELL = "mitchell"  # per map: share of its Mitchell pairs decided right
#: Title-only predictions: ``<model>/title/<metric>`` (``cbvae/title/...``, ``neuroquery/title/...``).
TITLE = "title"
#: Counterfactual direction: ``cbvae/counterfactual/<metric>`` and ``cbvae/counterfactual_cond_mean/<metric>``.
COUNTERFACTUAL = "counterfactual"
#: Generative measurements (``generative.py``): ``<predictor>/<metric>`` for the model (``cbvae``),
#: ``MODEL_COND``, ``HALF_MAP``, ``PCA_COMPLETION``, ``MEAN_MAP``, ``PEAK_RATE``.
COMPLETION_AUC = "completion_auc"  # AUC of the held-out half's peak voxels (the given half left out)
COMPLETION_R = "completion_r"  # Pearson r of the completion with the study's full map
JOINT_PEAK_LOGLIK = "joint_peak_loglik"  # log p(all peak voxels | conditions), nats per study
JOINT_PEAK_LOGLIK_PRIOR = "joint_peak_loglik_prior"  # the same estimated with the prior as proposal
CALIBRATION_BRIER = "calibration_brier"  # per-study Brier score of the per-voxel event probability


def column(predictor: str, metric: str) -> str:
    """The per-map column of ``predictor``'s ``metric`` (``column(NEUROQUERY, PEAK_AUC) == "neuroquery/peak_auc"``)."""
    return f"{predictor}/{metric}"
