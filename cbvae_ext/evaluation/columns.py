"""Names of the per-map test table's columns.

A column is ``<predictor>/<metric>``; the sections that write these columns and ``criteria.py`` that reads
them both take the names from here, so a rename is one edit.
"""

from __future__ import annotations

__all__ = [
    "BASELINE",
    "CALIBRATION_BRIER",
    "CATEGORY_MEAN",
    "COMPLETION_AUC",
    "COMPLETION_R",
    "COND",
    "CONSTANT_MAP",
    "DATA_CEILING",
    "DICE_TOP1",
    "DICE_TOP5",
    "ENTROPY_FLOOR",
    "CORRELATION_DECODER",
    "COUNTERFACTUAL",
    "DECODING",
    "HALF_MAP",
    "JOINT_PEAK_LOGLIK",
    "JOINT_PEAK_LOGLIK_PRIOR",
    "LOGLIK",
    "LOGLIK_ELBO",
    "LOGLIK_IWAE",
    "MEAN_MAP",
    "MITCHELL",
    "MODEL",
    "MODEL_COND",
    "NEAREST_TRAIN_R",
    "NEUROQUERY",
    "NOLAMBDA",
    "PEAK_AUC",
    "PEAK_LOGLIK",
    "PCA_COMPLETION",
    "PEAK_RATE",
    "PEARSON_R",
    "PROTOCOL_PREDICTORS",
    "QC",
    "RECON",
    "SSIM",
    "TERM_RECALL",
    "TITLE",
    "TOP1",
    "TOP5",
    "TOPIC_RIDGE",
    "UNCOND",
    "column",
    "hidden",
    "pca",
    "probe",
    "recon",
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
#: The other runs (``<run>/...`` like ``MODEL``'s) and the other reference predictors.
BASELINE = "baseline"  # the ResNet-10 baseline VAE
UNCOND = "uncond"  # the conditioning-off twin
NOLAMBDA = "nolambda"  # the λ = 0 twin
CONSTANT_MAP = "constant_map"  # every voxel at the training maps' mean (SSIM only)
DATA_CEILING = "data_ceiling"  # year probes on the PCA codes of the maps (L components)
#: Every predictor the protocols score, in report order.
PROTOCOL_PREDICTORS = (MODEL_COND, NEUROQUERY, CATEGORY_MEAN, TOPIC_RIDGE, MEAN_MAP)

#: Metrics (column suffixes).
PEARSON_R = "pearson_r"
DICE_TOP5 = "dice_top5"
DICE_TOP1 = "dice_top1"
SSIM = "ssim"
LOGLIK = "loglik"  # exact log-likelihood of a map without latent (the mean maps), nats per map
LOGLIK_IWAE = "loglik_iwae"  # a network's IWAE bound, nats per map
LOGLIK_ELBO = "loglik_elbo"  # its ELBO from the same samples
#: A network's own passes (``passes.score_network``): ``<run>/recon/<metric>`` (reconstruction at μ),
#: ``<run>/cond/<metric>`` (``MODEL_COND`` for the C-β-VAE), ``<run>/hidden_<group>/<metric>``, ``<run>/probe_<probe>``.
RECON = "recon"
COND = "cond"
#: Columns of the test maps themselves.
ENTROPY_FLOOR = "entropy_floor"  # summed binary entropy of the map's voxels, nats
NEAREST_TRAIN_R = "nearest_train_r"  # Pearson r with the closest training map
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


def pca(n_components: int) -> str:
    """The prefix of PCA with ``n_components`` components (``pca(32) == "pca_32"``)."""
    return f"pca_{int(n_components)}"


def recon(run: str, metric: str) -> str:
    """A run's reconstruction ``metric`` (``recon(MODEL, PEARSON_R) == "cbvae/recon/pearson_r"``)."""
    return column(column(run, RECON), metric)


def hidden(group: str) -> str:
    """The pass with condition ``group`` hidden (``"all"``: every group): ``hidden_<group>``."""
    return f"hidden_{group}"


def probe(name: str) -> str:
    """A year probe's per-map balanced-accuracy terms (``probe("mlp") == "probe_mlp"``)."""
    return f"probe_{name}"


#: The C-β-VAE's prefix for what is not a map prediction (``cbvae/decoding/top5``, ``cbvae/qc/score_clean``).
MODEL = "cbvae"
#: Decoding (``decoding.py``): ``cbvae/decoding/<metric>`` and ``correlation_decoder/<metric>``, 1/0 per study.
DECODING = "decoding"
CORRELATION_DECODER = "correlation_decoder"
TOP1 = "top1"
TOP5 = "top5"
TERM_RECALL = "term_recall"
#: Quality control (``quality_control.py``): ``cbvae/qc/score_<copy>`` typicality score per test study and copy.
QC = "qc"
