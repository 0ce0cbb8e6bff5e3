"""Formal evaluation of trained runs on the test split: paired statistics, likelihoods, baselines, probes, figures.

The names are imported on first use (``cbvae_ext.lazy``): a command of one submodule loads only what it uses.
"""

from __future__ import annotations

from cbvae_ext.lazy import lazy_exports

#: each public name and the submodule that defines it
_SOURCES = {
    "CategoryMeanBaseline": "baselines",
    "Evaluation": "workflow",
    "EvaluationError": "workflow",
    "LoadedRun": "workflow",
    "MeanMapBaseline": "baselines",
    "NeuroQueryBaseline": "text_protocols",
    "PAIRED_CRITERIA": "criteria",
    "PCABaseline": "baselines",
    "RESULTS_LAYOUT": "workflow",
    "RESULTS_LAYOUT_VERSION": "workflow",
    "ROLES": "workflow",
    "SSIM_PARAMS": "metrics",
    "TopicRidgeBaseline": "baselines",
    "adversary_balanced_accuracy": "probes",
    "balanced_accuracy_terms": "stats",
    "bernoulli_nll": "likelihood",
    "bootstrap_summary": "stats",
    "conditional_mean_probs": "conditional",
    "duplicate_report": "duplicates",
    "entropy_floor": "likelihood",
    "equivalent_dimension": "baselines",
    "evaluate_criteria": "criteria",
    "identification": "conditional",
    "importance_weighted_bound": "likelihood",
    "imputation_scores": "imputation",
    "json_safe": "workflow",
    "latent_free_nll": "likelihood",
    "load_run": "workflow",
    "make_probes": "probes",
    "masked_vectors": "metrics",
    "mitchell_scores": "text_protocols",
    "nearest_train_r": "duplicates",
    "paired_bootstrap": "stats",
    "peak_auc": "metrics",
    "peak_log_likelihood": "text_protocols",
    "pearson_r": "metrics",
    "probe_with_null": "probes",
    "score_maps": "metrics",
    "ssim_masked": "metrics",
    "title_tfidf": "text_protocols",
    "to_volumes": "metrics",
    "topk_dice": "metrics",
    "year_probes": "probes",
    "year_r2": "probes",
}

__all__ = sorted(_SOURCES)
__getattr__, __dir__ = lazy_exports(__name__, _SOURCES)
