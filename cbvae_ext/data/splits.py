"""Deterministic stratified subsets and grouped, stratified train/val/test splits.

Both use stratified systematic sampling: items are ordered by stratum (category x provisional year
bin) and, within a stratum, by a seeded hash of their id; then every k-th position is taken. This
gives every stratum its proportional share (to within one item) even when strata are tiny, and the
same inputs always give the same result. Splits order study groups, not rows, so all analyses of one
study share a split: in every run of 10 consecutive groups, position 0 goes to test, position 5 to
val and the other 8 to train (80/10/10).

A split group is a ``study_id`` joined with every study whose map has exactly the same peak voxels
(``duplicate_groups``): Neurosynth lists some papers twice under different ids, and their identical
maps on both sides of a split would flatter held-out scores.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

__all__ = [
    "SPLIT_FRACTIONS",
    "duplicate_groups",
    "merge_groups",
    "provisional_year_bins",
    "split_groups",
    "strata",
    "stratified_subset",
]

#: train / val / test fractions (positions of each block of 10 below).
SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
_TEST_SLOT, _VAL_SLOT = 0, 5


def _hash(keys: pd.Series, salt: str) -> np.ndarray:
    """A seeded pseudo-random but deterministic number per key."""
    return np.array(
        [int.from_bytes(hashlib.sha1(f"{salt}:{k}".encode()).digest()[:8], "big") for k in keys], dtype=np.uint64
    )


def _systematic_order(keys: pd.Series, stratum: pd.Series, salt: str) -> np.ndarray:
    """Positions of the items sorted by (stratum, hash of key)."""
    return np.lexsort((_hash(keys, salt), stratum.to_numpy().astype(str)))


def provisional_year_bins(years: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """Equal-frequency bins over all rows (the stored edges come later, from the training split); -1 = missing."""
    years = np.asarray(years, dtype=np.float64)
    out = np.full(len(years), -1, dtype=np.int64)
    ok = np.isfinite(years)
    if ok.any():
        edges = np.quantile(years[ok], np.linspace(0, 1, n_bins + 1))[1:-1]
        out[ok] = np.searchsorted(edges, years[ok], side="right")
    return out


def strata(categories: pd.Series, year_bins: np.ndarray) -> pd.Series:
    """Stratum label per row: ``"<category>|<year bin>"``."""
    return categories.fillna("<missing>").astype(str) + "|" + pd.Series(year_bins, index=categories.index).astype(str)


def stratified_subset(ids: pd.Series, stratum: pd.Series, n: int, seed: int = 0) -> np.ndarray:
    """Sorted row positions of the deterministic stratified subset of ``n`` rows."""
    if n >= len(ids):
        return np.arange(len(ids))
    order = _systematic_order(ids, stratum, f"subset{seed}")
    picks = np.floor((np.arange(n) + 0.5) * len(ids) / n).astype(np.int64)
    return np.sort(order[picks])


def split_groups(study_ids: pd.Series, stratum: pd.Series, seed: int = 0) -> np.ndarray:
    """``train``/``val``/``test`` per row, grouped by study and stratified by the group's first row."""
    first = pd.DataFrame({"g": study_ids.to_numpy(), "s": stratum.to_numpy()}).drop_duplicates("g")
    order = _systematic_order(first["g"], first["s"], f"split{seed}")
    slot = np.empty(len(first), dtype=np.int64)
    slot[order] = np.arange(len(first)) % 10
    label = np.where(slot == _TEST_SLOT, "test", np.where(slot == _VAL_SLOT, "val", "train"))
    return pd.Series(label, index=first["g"].to_numpy()).reindex(study_ids.to_numpy()).to_numpy().astype(object)


def duplicate_groups(row_of_peak: np.ndarray, voxel_of_peak: np.ndarray, n_rows: int) -> list[np.ndarray]:
    """Rows whose sets of peak voxels are identical (so their maps are byte-identical), as sorted row arrays.

    Args:
        row_of_peak: row index of each kept peak.
        voxel_of_peak: linear voxel index of each kept peak.
        n_rows: number of rows (rows without peaks are never duplicates).

    Returns:
        One array per group of >= 2 rows, ordered by the group's first row.
    """
    order = np.lexsort((voxel_of_peak, row_of_peak))
    rows, voxels = row_of_peak[order], voxel_of_peak[order]
    first = np.r_[True, (rows[1:] != rows[:-1]) | (voxels[1:] != voxels[:-1])]  # unique (row, voxel)
    rows, voxels = rows[first], voxels[first]
    bounds = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1], True])
    by_set: dict[bytes, list[int]] = {}
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        by_set.setdefault(voxels[a:b].astype(np.int64).tobytes(), []).append(int(rows[a]))
    groups = [np.array(g) for g in by_set.values() if len(g) > 1]
    return sorted(groups, key=lambda g: int(g[0]))


def merge_groups(study_ids: pd.Series, groups: list[np.ndarray]) -> np.ndarray:
    """Split-group key per row: its ``study_id``, joined (union-find) across each group of rows.

    The key of a joined group is its smallest ``study_id``, so it does not depend on row order.
    """
    ids = study_ids.astype(str).to_numpy()
    parent = {i: i for i in set(ids)}

    def root(i: str) -> str:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for group in groups:
        roots = sorted({root(ids[r]) for r in group})
        for other in roots[1:]:
            parent[other] = roots[0]
    return np.array([root(i) for i in ids], dtype=object)
