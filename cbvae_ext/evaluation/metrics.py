"""Per-map similarity metrics of predicted against real maps, as used by ``test_results.json``.

Every metric takes maps in the loader's normalised units (each real map divided by its maximum, so
values lie in [0, 1]) and returns one value per map; ``stats.py`` turns those values into bootstrap
summaries and paired comparisons.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from skimage.metrics import structural_similarity

__all__ = [
    "SSIM_PARAMS",
    "masked_vectors",
    "pearson_r",
    "peak_auc",
    "score_maps",
    "ssim_masked",
    "topk_dice",
    "topk_weights",
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
    "region": "the brain mask's bounding box, voxels outside the mask set to 0 in both volumes",
    "average": "mean of the local SSIM map over in-mask voxels only",
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


def topk_weights(x: np.ndarray, k: int) -> np.ndarray:
    """Membership of each voxel in the top ``k`` of its map, with ties shared deterministically.

    Voxels strictly above the k-th largest value ``t`` count 1; the ``n_t`` voxels equal to ``t`` share the
    remaining places, ``(k - n_above) / n_t`` each (their expected membership when ties are broken at
    random). Each row sums to ``k`` and the result does not depend on voxel order -- which matters for
    maps with fewer than ``k`` nonzero voxels, where the zeros tie.
    """
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    t = -np.partition(-x, k - 1, axis=1)[:, k - 1 : k]
    above, tied = x > t, x == t
    share = (k - above.sum(axis=1, keepdims=True)) / tied.sum(axis=1, keepdims=True)
    return above + tied * share


def topk_dice(pred: np.ndarray, target: np.ndarray, fraction: float) -> np.ndarray:
    """Dice overlap of the top ``fraction`` in-mask voxels of prediction and target, per map.

    ``k = max(1, round(fraction * V))``; ties at the k-th value are shared (``topk_weights``), so Dice is
    ``Σ w_pred w_target / k`` -- the expected Dice under random tie-breaking, independent of voxel order.
    This is the held-out-article protocol of NeuroConText (top 5% and 1%).

    Args:
        pred: ``[N, V]`` predicted in-mask voxels.
        target: ``[N, V]`` real in-mask voxels.
        fraction: share of voxels kept, in (0, 1].
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"top-k fraction must be in (0, 1], got {fraction}")
    pred, target = _check_pair(pred, target)
    k = max(1, int(round(fraction * pred.shape[1])))
    return (topk_weights(pred, k) * topk_weights(target, k)).sum(axis=1) / k


def peak_auc(pred: np.ndarray, peaks: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
    """Area under the ROC curve of each map ranking its study's peak voxels above the rest of the mask.

    The NeuroQuery protocol: ``peaks`` marks the voxels holding a reported focus; AUC 1 means every peak
    voxel outranks every other voxel, 0.5 is chance. Ties count half (Mann-Whitney with average ranks).

    Args:
        pred: ``[N, V]`` predicted in-mask voxels.
        peaks: ``[N, V]`` bool, True at a study's peak voxels.
        exclude: ``[N, V]`` bool voxels left out of the ranking altogether (neither peak nor other voxel),
            e.g. the peaks a completion was given; None = none.

    Returns:
        ``[N]`` AUC; NaN for a map with no peak voxel or no other voxel.
    """
    from scipy.stats import rankdata

    pred, peaks = np.atleast_2d(np.asarray(pred, dtype=np.float64)), np.atleast_2d(np.asarray(peaks, dtype=bool))
    if pred.shape != peaks.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from peak indicator shape {peaks.shape}")
    n_out = np.zeros(len(pred))
    if exclude is not None:
        exclude = np.broadcast_to(np.asarray(exclude, dtype=bool), pred.shape)
        # excluded voxels rank below every other one, so the others' ranks shift by exactly their count
        pred, peaks, n_out = np.where(exclude, -np.inf, pred), peaks & ~exclude, exclude.sum(axis=1).astype(np.float64)
    ranks = rankdata(pred, axis=1)
    n_pos = peaks.sum(axis=1).astype(np.float64)
    n_neg = peaks.shape[1] - n_pos - n_out
    u = (ranks * peaks).sum(axis=1) - n_pos * n_out - n_pos * (n_pos + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def ssim_masked(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """3D SSIM per map inside the brain mask: on the mask's bounding box, averaged over in-mask voxels.

    Over the whole box a near-empty map scores high on the zeros outside the brain; here only windows
    centred in the brain count (``SSIM_PARAMS``). Print it beside a constant map and the mean map.

    Args:
        pred: ``[N, V]`` predicted in-mask voxels.
        target: ``[N, V]`` real in-mask voxels.
        mask: bool brain mask ``[D, H, W]``.
    """
    pred, target = _check_pair(pred, target)
    mask = np.asarray(mask, dtype=bool)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(mask))
    inside = mask[box]
    win = min(SSIM_PARAMS["win_size"], *[s - (1 - s % 2) for s in inside.shape])
    kwargs = {k: SSIM_PARAMS[k] for k in ("data_range", "gaussian_weights", "K1", "K2", "use_sample_covariance")}
    out = np.empty(len(pred))
    for i, (p, t) in enumerate(zip(to_volumes(pred, mask), to_volumes(target, mask), strict=True)):
        _, local = structural_similarity(
            p[box].astype(np.float64), t[box].astype(np.float64), win_size=win, full=True, **kwargs
        )
        out[i] = local[inside].mean()
    return out


def score_maps(pred: np.ndarray, target: np.ndarray, mask: np.ndarray, ssim: bool = False) -> dict[str, np.ndarray]:
    """Every per-map similarity metric of ``[N, V]`` in-mask predictions against the real maps.

    Returns:
        ``pearson_r``, ``dice_top5``, ``dice_top1`` and (``ssim=True``) ``ssim`` (``ssim_masked``), each ``[N]``.
    """
    out = {
        "pearson_r": pearson_r(pred, target),
        "dice_top5": topk_dice(pred, target, 0.05),
        "dice_top1": topk_dice(pred, target, 0.01),
    }
    if ssim:
        out["ssim"] = ssim_masked(pred, target, mask)
    return out
