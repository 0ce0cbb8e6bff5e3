"""Formal evaluation of trained runs on the test split: metrics, baselines, probes, imputation, figures."""

from __future__ import annotations

from cbvae_ext.evaluation.baselines import CategoryMeanBaseline, MeanMapBaseline, PCABaseline
from cbvae_ext.evaluation.imputation import imputation_scores
from cbvae_ext.evaluation.metrics import (
    SSIM_PARAMS,
    bootstrap_summary,
    masked_vectors,
    pearson_r,
    score_maps,
    ssim_3d,
    to_volumes,
    topk_dice,
)
from cbvae_ext.evaluation.probes import adversary_balanced_accuracy, make_probes, probe_with_null, year_probes, year_r2
from cbvae_ext.evaluation.run import Evaluation, EvaluationError, LoadedRun, load_run

__all__ = [
    "SSIM_PARAMS",
    "CategoryMeanBaseline",
    "Evaluation",
    "EvaluationError",
    "LoadedRun",
    "MeanMapBaseline",
    "PCABaseline",
    "adversary_balanced_accuracy",
    "bootstrap_summary",
    "imputation_scores",
    "load_run",
    "make_probes",
    "masked_vectors",
    "pearson_r",
    "probe_with_null",
    "score_maps",
    "ssim_3d",
    "to_volumes",
    "topk_dice",
    "year_probes",
    "year_r2",
]
