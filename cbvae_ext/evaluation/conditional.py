"""Conditions as the model sees them: conditional mean maps and category identification.

Condition groups are ``schema.ConditionGroup`` (``schema.groups``); hiding one is
``cbvae_ext.networks.conditioning.hide_groups``, the function condition dropout uses too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cbvae_ext.evaluation.metrics import pearson_r
from cbvae_ext.export import has_conditional_mean_path

__all__ = ["conditional_mean_probs", "identification"]


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
