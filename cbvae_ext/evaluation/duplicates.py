"""Test maps with an exact or near-exact training neighbour (duplicate studies flatter reconstruction)."""

from __future__ import annotations

from typing import Any

import numpy as np

from cbvae_ext.evaluation.columns import MODEL, NEAREST_TRAIN_R, PEARSON_R, recon
from cbvae_ext.evaluation.section import EvalData, Section

__all__ = ["NEAR_DUPLICATE_R", "duplicate_report", "duplicates_section", "nearest_train_r"]

#: A test map whose Pearson r with some training map exceeds this is a near-duplicate.
NEAR_DUPLICATE_R = 0.99


def _standardise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    x = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def nearest_train_r(test: np.ndarray, train: np.ndarray, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Highest Pearson r of each test map with any training map, and that map's index.

    Args:
        test: ``[N, V]`` in-mask test maps.
        train: ``[M, V]`` in-mask training maps.
        chunk: training maps per matrix product (bounds memory).
    """
    t = _standardise(test)
    best = np.full(len(t), -np.inf, dtype=np.float64)
    arg = np.zeros(len(t), dtype=np.int64)
    for start in range(0, len(train), chunk):
        r = t @ _standardise(train[start : start + chunk]).T
        j = r.argmax(axis=1)
        value = r[np.arange(len(t)), j]
        better = value > best
        best[better], arg[better] = value[better], start + j[better]
    return np.clip(best, -1.0, 1.0), arg


def duplicate_report(test: np.ndarray, train: np.ndarray, test_ids: list[str], train_ids: list[str]) -> dict[str, Any]:
    """Counts of test maps identical (every voxel equal) or near-identical (r > ``NEAR_DUPLICATE_R``) to a training map.

    Returns:
        ``n_test``, ``n_exact``, ``n_near`` (exact included), ``threshold_r``, ``pairs`` (test id, training id,
        r, exact) for every near duplicate, and the per-map ``nearest_r`` (for the per-map table).
    """
    r, j = nearest_train_r(test, train)
    near = np.flatnonzero(r > NEAR_DUPLICATE_R)
    exact = np.array([np.array_equal(test[i], train[j[i]]) for i in near], dtype=bool)
    return {
        "n_test": int(len(test)),
        "n_exact": int(exact.sum()),
        "n_near": int(near.size),
        "threshold_r": NEAR_DUPLICATE_R,
        "pairs": [
            {"test_id": test_ids[i], "train_id": train_ids[j[i]], "r": float(r[i]), "exact": bool(e)}
            for i, e in zip(near, exact, strict=True)
        ],
        "nearest_r": r,
    }


def duplicates_section(data: EvalData) -> Section:
    """Near duplicates of the test maps among the training maps, and the model's r without them.

    Writes the ``nearest_train_r`` column; reads the C-β-VAE's ``recon`` r from ``data.cache["columns"]``.
    """
    report = duplicate_report(data.test.maps, data.train.maps, data.test.ids, data.train.ids)
    nearest = report.pop("nearest_r")
    model_r = data.cache.get("columns", {}).get(recon(MODEL, PEARSON_R))
    if model_r is not None:
        report["cbvae_r_without_near_duplicates"] = data.summary(model_r[nearest <= report["threshold_r"]])
    report["searched_train_maps"] = data.train.n
    return Section("duplicates", report, {NEAREST_TRAIN_R: nearest})
