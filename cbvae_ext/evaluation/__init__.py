"""Formal evaluation of trained runs on the test split: paired statistics, likelihoods, baselines, probes, figures."""

from __future__ import annotations

from cbvae_ext.evaluation.baselines import (
    CategoryMeanBaseline,
    MeanMapBaseline,
    PCABaseline,
    TopicRidgeBaseline,
    equivalent_dimension,
)
from cbvae_ext.evaluation.conditional import conditional_mean_probs, identification
from cbvae_ext.evaluation.criteria import PAIRED_CRITERIA, evaluate_criteria
from cbvae_ext.evaluation.duplicates import duplicate_report, nearest_train_r
from cbvae_ext.evaluation.imputation import imputation_scores
from cbvae_ext.evaluation.likelihood import bernoulli_nll, entropy_floor, importance_weighted_bound, latent_free_nll
from cbvae_ext.evaluation.metrics import (
    SSIM_PARAMS,
    masked_vectors,
    peak_auc,
    pearson_r,
    score_maps,
    ssim_masked,
    to_volumes,
    topk_dice,
)
from cbvae_ext.evaluation.probes import adversary_balanced_accuracy, make_probes, probe_with_null, year_probes, year_r2
from cbvae_ext.evaluation.stats import balanced_accuracy_terms, bootstrap_summary, paired_bootstrap
from cbvae_ext.evaluation.text_protocols import (
    NeuroQueryBaseline,
    mitchell_scores,
    peak_log_likelihood,
    title_tfidf,
)
from cbvae_ext.evaluation.workflow import (
    RESULTS_LAYOUT,
    RESULTS_LAYOUT_VERSION,
    ROLES,
    Evaluation,
    EvaluationError,
    LoadedRun,
    json_safe,
    load_run,
)

__all__ = [
    "PAIRED_CRITERIA",
    "RESULTS_LAYOUT",
    "RESULTS_LAYOUT_VERSION",
    "ROLES",
    "SSIM_PARAMS",
    "CategoryMeanBaseline",
    "Evaluation",
    "EvaluationError",
    "LoadedRun",
    "MeanMapBaseline",
    "NeuroQueryBaseline",
    "PCABaseline",
    "TopicRidgeBaseline",
    "adversary_balanced_accuracy",
    "balanced_accuracy_terms",
    "bernoulli_nll",
    "bootstrap_summary",
    "conditional_mean_probs",
    "duplicate_report",
    "entropy_floor",
    "equivalent_dimension",
    "evaluate_criteria",
    "identification",
    "importance_weighted_bound",
    "imputation_scores",
    "latent_free_nll",
    "json_safe",
    "load_run",
    "make_probes",
    "masked_vectors",
    "mitchell_scores",
    "nearest_train_r",
    "paired_bootstrap",
    "pearson_r",
    "peak_auc",
    "peak_log_likelihood",
    "probe_with_null",
    "score_maps",
    "ssim_masked",
    "title_tfidf",
    "to_volumes",
    "topk_dice",
    "year_probes",
    "year_r2",
]
