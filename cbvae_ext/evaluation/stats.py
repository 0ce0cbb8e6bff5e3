"""Bootstrap statistics over held-out maps: one method's mean, and paired differences of two methods.

Every claim "A beats B" in ``test_results.json`` is a paired comparison on the same maps: the per-map
differences ``a_i - b_i`` are resampled with replacement (the same resampled maps for both methods) and
the claim passes only when the 95% percentile interval of the mean difference excludes 0 in the claimed
direction.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["DIRECTIONS", "balanced_accuracy_terms", "bootstrap_summary", "paired_bootstrap"]

#: Claimed direction of a paired comparison: ``"greater"`` (a > b) or ``"less"`` (a < b).
DIRECTIONS = ("greater", "less")


def _percentile_ci(values: np.ndarray, n_bootstrap: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.size, size=(n_bootstrap, values.size))
    lo, hi = np.quantile(values[idx].mean(axis=1), [0.025, 0.975])
    return float(lo), float(hi)


def _check_n_bootstrap(n_bootstrap: int) -> None:
    if int(n_bootstrap) < 1:
        raise ValueError(f"n_bootstrap must be >= 1 (1000 for reported figures), got {n_bootstrap}")


def bootstrap_summary(values: np.ndarray, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Mean, sd and 95% percentile-bootstrap CI of the mean over maps.

    Non-finite values (e.g. the correlation of a constant map) are left out and counted in ``n_missing``.

    Args:
        values: one value per held-out map.
        n_bootstrap: number of resamples with replacement (>= 1).
        seed: seed of the resampling generator.
    """
    _check_n_bootstrap(n_bootstrap)
    values = np.asarray(values, dtype=np.float64).ravel()
    finite = values[np.isfinite(values)]
    out: dict[str, Any] = {"n": int(finite.size), "n_missing": int(values.size - finite.size)}
    if finite.size == 0:
        return {**out, "mean": None, "sd": None, "ci95": [None, None], "n_bootstrap": int(n_bootstrap)}
    return {
        **out,
        "mean": float(finite.mean()),
        "sd": float(finite.std(ddof=1)) if finite.size > 1 else 0.0,
        "ci95": list(_percentile_ci(finite, int(n_bootstrap), seed)),
        "n_bootstrap": int(n_bootstrap),
    }


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    direction: str = "greater",
    n_bootstrap: int = 1000,
    seed: int = 0,
    margin: float = 0.0,
) -> dict[str, Any]:
    """Paired bootstrap of the per-map differences ``a - b`` on the same maps.

    Maps where either value is not finite are left out of both (counted in ``n_missing``).

    Args:
        a: per-map values of method A.
        b: per-map values of method B, same maps in the same order.
        direction: the claim, ``"greater"`` (A above B) or ``"less"`` (A below B).
        n_bootstrap: resamples of the maps (>= 1).
        seed: seed of the resampling.
        margin: the claim is ``a - b > -margin`` (``"greater"``) or ``a - b < margin`` (``"less"``); 0 = strict.

    Returns:
        ``mean_a``, ``mean_b``, ``mean_diff``, ``ci95`` (of the mean difference), ``n``, ``n_missing``,
        ``direction``, ``margin``, ``n_bootstrap`` and ``passed`` (the CI lies entirely on the claimed side;
        None when no map is left).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    _check_n_bootstrap(n_bootstrap)
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same maps: {a.size} vs {b.size} values")
    ok = np.isfinite(a) & np.isfinite(b)
    out: dict[str, Any] = {
        "n": int(ok.sum()),
        "n_missing": int(a.size - ok.sum()),
        "direction": direction,
        "margin": float(margin),
        "n_bootstrap": int(n_bootstrap),
    }
    if not ok.any():
        return {**out, "mean_a": None, "mean_b": None, "mean_diff": None, "ci95": [None, None], "passed": None}
    diff = a[ok] - b[ok]
    lo, hi = _percentile_ci(diff, int(n_bootstrap), seed)
    passed = lo > -margin if direction == "greater" else hi < margin
    return {
        **out,
        "mean_a": float(a[ok].mean()),
        "mean_b": float(b[ok].mean()),
        "mean_diff": float(diff.mean()),
        "ci95": [lo, hi],
        "passed": bool(passed),
    }


def balanced_accuracy_terms(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Per-map terms whose mean is the balanced accuracy, so two classifiers can be paired map by map.

    Balanced accuracy ``(1/C) Σ_c (1/n_c) Σ_{i∈c} [ŷ_i = y_i]`` equals the mean over maps of
    ``N [ŷ_i = y_i] / (C n_{c(i)})`` (C classes present in ``y_true``, N maps).
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    classes, inverse, counts = np.unique(y_true, return_inverse=True, return_counts=True)
    weight = y_true.size / (classes.size * counts[inverse])
    return weight * (y_true == y_pred)
