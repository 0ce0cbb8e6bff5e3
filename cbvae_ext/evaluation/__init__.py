"""Formal evaluation of trained runs on the test split: paired statistics, likelihoods, baselines, probes, figures.

The names are imported on first use (``cbvae_ext.lazy``): a command of one submodule loads only what it uses.
"""

from __future__ import annotations

from cbvae_ext.lazy import lazy_exports

#: each submodule and the public names it defines
_SOURCES = {
    "baselines": "CategoryMeanBaseline MeanMapBaseline PCABaseline TopicRidgeBaseline equivalent_dimension",
    "conditional": "conditional_mean_probs identification",
    "criteria": "PAIRED_CRITERIA evaluate_criteria",
    "duplicates": "duplicate_report nearest_train_r",
    "imputation": "imputation_scores",
    "likelihood": "bernoulli_nll entropy_floor importance_weighted_bound latent_free_nll",
    "metrics": "SSIM_PARAMS masked_vectors peak_auc pearson_r score_maps ssim_masked to_volumes topk_dice",
    "probes": "adversary_balanced_accuracy make_probes probe_with_null year_probes year_r2",
    "stats": "balanced_accuracy_terms bootstrap_summary paired_bootstrap",
    "text_protocols": "NeuroQueryBaseline mitchell_scores peak_log_likelihood title_tfidf",
    "workflow": "Evaluation EvaluationError LoadedRun RESULTS_LAYOUT RESULTS_LAYOUT_VERSION ROLES json_safe load_run",
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _SOURCES)
