"""Scores of imputed metadata against held-out observed values, next to a training-median predictor."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import spearmanr

__all__ = ["imputation_scores"]


def imputation_scores(imputed: np.ndarray, true: np.ndarray, train_median: float) -> dict[str, Any]:
    """Spearman ρ and MAE of imputed vs true values, and the MAE of always predicting the training median.

    Only rows where ``true`` is finite (observed) are scored; values are in raw units (e.g. participants).

    Args:
        imputed: model imputation per held-out row (the field hidden from the model).
        true: observed value per row (NaN = not observed, skipped).
        train_median: median of the observed training values.

    Returns:
        ``n``, ``spearman_rho`` (None when fewer than 3 rows or a constant vector), ``mae``, ``median_mae``,
        ``median_value`` and ``beats_median`` (``mae < median_mae``; None when nothing is observed).
    """
    imputed, true = np.asarray(imputed, dtype=np.float64), np.asarray(true, dtype=np.float64)
    ok = np.isfinite(true) & np.isfinite(imputed)
    n = int(ok.sum())
    out: dict[str, Any] = {"n": n, "median_value": float(train_median)}
    if n == 0:
        return {**out, "spearman_rho": None, "mae": None, "median_mae": None, "beats_median": None}
    a, b = imputed[ok], true[ok]
    rho = None
    if n >= 3 and np.ptp(a) > 0 and np.ptp(b) > 0:
        rho = float(spearmanr(a, b).statistic)
    mae, median_mae = float(np.abs(a - b).mean()), float(np.abs(train_median - b).mean())
    return {**out, "spearman_rho": rho, "mae": mae, "median_mae": median_mae, "beats_median": mae < median_mae}
