"""The real data beside a prediction: the studies nearest to the current conditions and their mean map.

Nearness in topic space is the Bhattacharyya coefficient ``sum_t sqrt(p_t q_t)`` of two topic mixtures
(1 = the same mixture, 0 = no topic in common), the natural similarity of probability vectors; it ranks
like the Hellinger distance. A task category, when set, restricts the candidates to that category; with a
category and no topics the studies of the category are listed, most recent first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["Evidence", "find_evidence", "map_correlation"]

#: Splits counted as held out (never seen by the training loss).
HELD_OUT = ("val", "test")


@dataclass
class Evidence:
    """Studies nearest to the conditions.

    Attributes:
        held_out: nearest held-out studies (``id``, ``title``, ``year``, ``category``, ``split``, ``similarity``).
        training: nearest training studies, same columns.
        matching: ids of the studies averaged into the mean real map (both splits).
        rule: one sentence saying how the studies were chosen.
    """

    held_out: pd.DataFrame
    training: pd.DataFrame
    matching: list[str]
    rule: str


def find_evidence(
    studies: pd.DataFrame,
    topics: np.ndarray | None,
    query_topics: np.ndarray | None,
    task: str | None,
    n_list: int = 5,
    n_mean: int = 25,
) -> Evidence | None:
    """The studies the current conditions stand on.

    Args:
        studies: one row per study with ``id``, ``title``, ``year``, ``category``, ``split``.
        topics: ``[N, T]`` topic weights of those studies (NaN rows: unknown), or None.
        query_topics: ``[T]`` topic mixture of the current conditions, or None.
        task: the current task category, or None.
        n_list: studies listed per split.
        n_mean: studies averaged into the mean map.

    Returns:
        None when neither topics nor a task is set (nothing to match on).
    """
    keep = np.ones(len(studies), dtype=bool)
    if task is not None:
        keep &= studies["category"].to_numpy(dtype=object) == task  # numpy: 20x faster than Arrow strings
    use_topics = query_topics is not None and topics is not None and float(np.sum(query_topics)) > 0
    if use_topics:
        rows = np.nan_to_num(np.clip(np.asarray(topics, dtype=np.float64), 0, None))
        rows = rows / np.maximum(rows.sum(axis=1, keepdims=True), 1e-12)
        q = np.clip(np.asarray(query_topics, dtype=np.float64), 0, None)
        similarity = np.sqrt(rows) @ np.sqrt(q / q.sum())
        keep &= np.isfinite(np.asarray(topics, dtype=np.float64)).all(axis=1) & (rows.sum(axis=1) > 0)
        order = np.argsort(-np.where(keep, similarity, -np.inf), kind="stable")
        rule = "nearest in topic space (Bhattacharyya similarity of the topic mixtures)" + (
            f", task category {task}" if task else ""
        )
    elif task is not None:
        similarity = np.full(len(studies), np.nan)
        years = pd.to_numeric(studies["year"], errors="coerce").fillna(-np.inf).to_numpy()
        order = np.argsort(-np.where(keep, years, -np.inf), kind="stable")
        rule = f"studies of the task category {task}, most recent first"
    else:
        return None
    order = order[keep[order]]
    table = studies.iloc[order][["id", "title", "year", "category", "split"]].copy()
    table["similarity"] = similarity[order]
    held = table["split"].isin(HELD_OUT).to_numpy()
    return Evidence(
        held_out=table.loc[held].head(n_list).reset_index(drop=True),
        training=table.loc[~held].head(n_list).reset_index(drop=True),
        matching=table["id"].head(n_mean).tolist(),
        rule=rule,
    )


def map_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Pearson correlation of two maps inside the mask (NaN when either is constant)."""
    x = np.asarray(a, dtype=np.float64)[mask] if mask is not None else np.ravel(a).astype(np.float64)
    y = np.asarray(b, dtype=np.float64)[mask] if mask is not None else np.ravel(b).astype(np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denom) if denom > 0 else float("nan")
