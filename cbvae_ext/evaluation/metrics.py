"""Per-map reconstruction metrics and the bootstrap summary used by ``test_results.json``.

Every metric takes maps in the loader's normalised units (each real map divided by its maximum, so
values lie in [0, 1]) and returns one value per map; ``bootstrap_summary`` turns those values into the
mean, sd and 95% percentile-bootstrap interval reported for each model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from skimage.metrics import structural_similarity

__all__ = [
    "SSIM_PARAMS",
    "bootstrap_summary",
    "masked_vectors",
    "pearson_r",
    "score_maps",
    "ssim_3d",
    "topk_dice",
    "to_volumes",
]

#: Parameters of the 3D SSIM; recorded verbatim in ``test_results.json``.
SSIM_PARAMS: dict[str, Any] = {
    "implementation": "skimage.metrics.structural_similarity",
    "data_range": 1.0,
    "win_size": 7,
    "gaussian_weights": False,
    "K1": 0.01,
    "K2": 0.03,
    "use_sample_covariance": True,
    "outside_mask": "set to 0 in both volumes",
}


def masked_vectors(volumes: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``[N, D, H, W]`` (or ``[N, 1, D, H, W]``) volumes to ``[N, V]`` in-mask float32 vectors."""
    volumes = np.asarray(volumes)
    if volumes.ndim == mask.ndim + 2:
        volumes = volumes[:, 0]
    return np.asarray(volumes[:, mask.astype(bool)], dtype=np.float32)


def to_volumes(vectors: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``[N, V]`` in-mask vectors back to ``[N, D, H, W]`` volumes, zero outside the mask."""
    vectors = np.atleast_2d(vectors)
    out = np.zeros((vectors.shape[0], *mask.shape), dtype=np.float32)
    out[:, mask.astype(bool)] = vectors
    return out


def _check_pair(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.atleast_2d(np.asarray(pred, dtype=np.float64))
    target = np.atleast_2d(np.asarray(target, dtype=np.float64))
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    return pred, target


def pearson_r(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Voxel-wise Pearson correlation per map.

    Args:
        pred: ``[N, V]`` predicted in-mask voxels.
        target: ``[N, V]`` real in-mask voxels.

    Returns:
        ``[N]`` correlations; NaN where either map is constant (correlation undefined).
    """
    pred, target = _check_pair(pred, target)
    p = pred - pred.mean(axis=1, keepdims=True)
    t = target - target.mean(axis=1, keepdims=True)
    denom = np.sqrt((p * p).sum(axis=1) * (t * t).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (p * t).sum(axis=1) / denom
    return np.where(denom > 0, r, np.nan)


def _topk_sets(x: np.ndarray, k: int) -> np.ndarray:
    # stable sort: ties (e.g. binary MKDA maps) are broken by voxel order, the same way for both maps
    order = np.argsort(-x, axis=1, kind="stable")[:, :k]
    sel = np.zeros(x.shape, dtype=bool)
    np.put_along_axis(sel, order, True, axis=1)
    return sel


def topk_dice(pred: np.ndarray, target: np.ndarray, fraction: float) -> np.ndarray:
    """Dice overlap of the top ``fraction`` in-mask voxels of prediction and target, per map.

    Both sets hold exactly ``k = max(1, round(fraction * V))`` voxels (ties broken by voxel order), so
    Dice equals ``|A ∩ B| / k``. This is the held-out-article protocol of NeuroConText (top 5% and 1%).

    Args:
        pred: ``[N, V]`` predicted in-mask voxels.
        target: ``[N, V]`` real in-mask voxels.
        fraction: share of voxels kept, in (0, 1].
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"top-k fraction must be in (0, 1], got {fraction}")
    pred, target = _check_pair(pred, target)
    k = max(1, int(round(fraction * pred.shape[1])))
    a, b = _topk_sets(pred, k), _topk_sets(target, k)
    return 2.0 * (a & b).sum(axis=1) / (a.sum(axis=1) + b.sum(axis=1))


def ssim_3d(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """3D SSIM per map with ``SSIM_PARAMS`` (scikit-image).

    Args:
        pred: ``[N, D, H, W]`` predicted volumes in [0, 1].
        target: ``[N, D, H, W]`` real volumes in [0, 1].
        mask: optional brain mask ``[D, H, W]``; voxels outside it are zeroed in both volumes.
    """
    pred, target = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(f"SSIM needs two [N, D, H, W] arrays of one shape, got {pred.shape} and {target.shape}")
    keep = np.ones(pred.shape[1:], dtype=bool) if mask is None else mask.astype(bool)
    win = min(SSIM_PARAMS["win_size"], *[s - (1 - s % 2) for s in pred.shape[1:]])  # odd, fits the grid
    kwargs = {k: SSIM_PARAMS[k] for k in ("data_range", "gaussian_weights", "K1", "K2", "use_sample_covariance")}
    return np.array(
        [structural_similarity(p * keep, t * keep, win_size=win, **kwargs) for p, t in zip(pred, target, strict=True)]
    )


def score_maps(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Every per-map similarity metric of ``[N, V]`` in-mask predictions against the real maps.

    Returns:
        ``pearson_r``, ``ssim`` (on the volumes rebuilt from ``mask``), ``dice_top5`` and ``dice_top1``, each ``[N]``.
    """
    return {
        "pearson_r": pearson_r(pred, target),
        "ssim": ssim_3d(to_volumes(pred, mask), to_volumes(target, mask), mask),
        "dice_top5": topk_dice(pred, target, 0.05),
        "dice_top1": topk_dice(pred, target, 0.01),
    }


def bootstrap_summary(values: np.ndarray, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Mean, sd and 95% percentile-bootstrap CI of the mean over maps.

    Non-finite values (e.g. the correlation of a constant map) are left out and counted in ``n_missing``.

    Args:
        values: one value per held-out map.
        n_bootstrap: number of resamples with replacement.
        seed: seed of the resampling generator.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    finite = values[np.isfinite(values)]
    out: dict[str, Any] = {"n": int(finite.size), "n_missing": int(values.size - finite.size)}
    if finite.size == 0:
        return {**out, "mean": None, "sd": None, "ci95": [None, None], "n_bootstrap": int(n_bootstrap)}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, finite.size, size=(n_bootstrap, finite.size))
    means = finite[idx].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return {
        **out,
        "mean": float(finite.mean()),
        "sd": float(finite.std(ddof=1)) if finite.size > 1 else 0.0,
        "ci95": [float(lo), float(hi)],
        "n_bootstrap": int(n_bootstrap),
    }
