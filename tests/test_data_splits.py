"""Split groups: identical maps (same peak voxels) land in one split, whatever their study ids."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cbvae_ext.data.splits import duplicate_groups, merge_groups, split_groups, strata


def test_duplicate_groups_find_identical_voxel_sets() -> None:
    # rows 0 and 3 share voxels {5, 9} (peak order and repeats do not matter); rows 1 and 4 share {7};
    # row 2 has {5, 9, 11}; row 5 has no peak
    row = np.array([0, 0, 0, 1, 2, 2, 2, 3, 3, 4])
    voxel = np.array([9, 5, 9, 7, 5, 9, 11, 5, 9, 7])
    groups = duplicate_groups(row, voxel, 6)
    assert [g.tolist() for g in groups] == [[0, 3], [1, 4]]
    assert duplicate_groups(np.array([0, 1]), np.array([1, 2]), 2) == []


def test_merge_groups_joins_study_ids_transitively() -> None:
    ids = pd.Series(["s3", "s1", "s2", "s2", "s4"])
    keys = merge_groups(ids, [np.array([0, 1]), np.array([1, 3])])
    # s3 ~ s1 (rows 0, 1) and s1 ~ s2 (rows 1, 3): one group keyed by the smallest id; s4 alone
    assert keys.tolist() == ["s1", "s1", "s1", "s1", "s4"]


def test_duplicates_share_a_split() -> None:
    """With study ids alone, some duplicate pairs straddle splits; with merged keys none does."""
    n = 400
    ids = pd.Series([f"study{i:03d}" for i in range(n)])
    stratum = strata(pd.Series(["a", "b"] * (n // 2)), np.zeros(n, dtype=int))
    pairs = [np.array([i, i + 1]) for i in range(0, n, 2)]  # every even row duplicates the next one
    before = split_groups(ids, stratum)
    assert sum(before[a] != before[b] for a, b in pairs) > 0
    after = split_groups(pd.Series(merge_groups(ids, pairs)), stratum)
    assert all(after[a] == after[b] for a, b in pairs)
    assert set(after) == {"train", "val", "test"}
