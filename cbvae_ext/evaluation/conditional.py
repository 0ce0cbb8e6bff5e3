"""Conditions as the model sees them: condition groups, hiding a group, conditional mean maps, identification.

A condition group is one entry of ``meta_mask`` and its slice of ``meta`` (``schema.groups``: each
continuous field, the topic vector, the task one-hot). Hiding a group sets its values to 0 and its mask
entry to 0 -- exactly what a study without that metadata looks like.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cbvae_ext.evaluation.metrics import pearson_r
from cbvae_ext.export import has_conditional_mean_path

__all__ = [
    "ConditionGroup",
    "condition_groups",
    "conditional_mean_probs",
    "hide_groups",
    "identification",
]


@dataclass(frozen=True)
class ConditionGroup:
    """One condition: its name, kind (``continuous``/``vector``/``categorical``), ``meta`` slice and mask index."""

    name: str
    kind: str
    meta_slice: slice
    mask_index: int


def condition_groups(schema: Any) -> list[ConditionGroup]:
    """The schema's condition groups in mask order (``schema.groups``; derived for a schema without it)."""
    groups = getattr(schema, "groups", None)
    if groups is not None:
        return [ConditionGroup(g.name, g.kind, g.meta_slice, int(g.mask_index)) for g in groups]
    n = schema.n_continuous
    out = [ConditionGroup(f.name, "continuous", slice(j, j + 1), j) for j, f in enumerate(schema.fields)]
    return [*out, ConditionGroup("task", "categorical", slice(n, n + schema.n_categories), n)]


def hide_groups(meta: np.ndarray, meta_mask: np.ndarray, groups: list[ConditionGroup]) -> tuple[np.ndarray, np.ndarray]:
    """Copies of ``(meta, meta_mask)`` with every group in ``groups`` missing (values 0, mask 0)."""
    meta, meta_mask = np.array(meta, copy=True), np.array(meta_mask, copy=True)
    for g in groups:
        meta[:, g.meta_slice] = 0.0
        meta_mask[:, g.mask_index] = 0.0
    return meta, meta_mask


def conditional_mean_probs(
    model: torch.nn.Module, m: torch.Tensor, n_prior_samples: int, generator: torch.Generator
) -> tuple[torch.Tensor, str]:
    """The model's estimate of the conditional mean map ``E[x | m]`` (probabilities ``[B, 1, D, H, W]``).

    Uses the network's conditional-mean path when it has one, else the average of ``n_prior_samples``
    decodes of ``z ~ N(0, I)`` (a Monte-Carlo estimate of the same expectation under the model).

    Returns:
        ``(probabilities, source)`` where ``source`` says which estimate was used.
    """
    # only a fitted path is a conditional mean; the baseline's would be decode(0, m), a typical map
    if has_conditional_mean_path(model):
        return torch.sigmoid(model.conditional_mean(m).float()), "conditional-mean path of the network"
    latent = int(model.latent_size)
    total = None
    for _ in range(n_prior_samples):
        z = torch.randn((len(m), latent), generator=generator).to(m.device)
        p = torch.sigmoid(model.decode(z, m).float())
        total = p if total is None else total + p
    return total / n_prior_samples, f"average of {n_prior_samples} decodes of z ~ N(0, I)"


def identification(generated: np.ndarray, heldout: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Which held-out group mean each generated group map correlates with best.

    Args:
        generated: ``[C, V]`` one map per group (e.g. the conditional mean of each category).
        heldout: ``[C, V]`` the held-out mean map of the same groups, same order.
        labels: group names.

    Returns:
        ``labels``, ``r`` (``[C, C]`` correlations, generated rows x held-out columns), ``best`` (column index of
        each row's highest r), ``n_correct`` (rows whose best match is their own group), ``n_groups`` and
        ``own_r`` (each group's r with its own held-out mean).
    """
    g, h = np.asarray(generated, dtype=np.float64), np.asarray(heldout, dtype=np.float64)
    r = np.array([pearson_r(np.broadcast_to(row, h.shape), h) for row in g])
    best = np.nanargmax(np.nan_to_num(r, nan=-np.inf), axis=1)
    return {
        "labels": list(labels),
        "r": r.tolist(),
        "best": [int(b) for b in best],
        "n_correct": int((best == np.arange(len(g))).sum()),
        "n_groups": len(g),
        "own_r": [float(r[i, i]) for i in range(len(g))],
    }
