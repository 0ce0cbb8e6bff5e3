"""The uncertainty view: how much maps generated for the same conditions differ from one another.

A conditional VAE holds a distribution of maps per condition set, not one map: ``S`` latent codes drawn from the
prior ``z ~ N(0, I)`` (seeded, so a view is reproducible) are decoded under the conditions in one batch, and the
per-voxel standard deviation of those maps is the spread shown beside the generated map.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["N_SAMPLES", "prior_spread"]

#: Prior draws behind the spread (one batch: ~16 decodes' worth of work once per condition set).
N_SAMPLES = 16


def prior_spread(
    model: Any,
    conditions: Mapping[str, Any],
    allow_extrapolation: bool = False,
    imputed: Mapping[str, float] | None = None,
    n: int = N_SAMPLES,
    seed: int = 0,
) -> np.ndarray:
    """Per-voxel standard deviation ``[D, H, W]`` of ``n`` maps decoded from prior draws under ``conditions``.

    Args:
        model: a ``CounterfactualModel`` (``cbvae_ext.inference``).
        conditions: the named conditions of the view.
        allow_extrapolation: accept conditions outside the training range.
        imputed: raw values for the fields left unknown.
        n: number of prior draws (at least 2).
        seed: seed of the draws.
    """
    if n < 2:
        raise ValueError(f"a spread needs at least 2 sampled maps, got n={n}")
    z = np.random.default_rng(seed).standard_normal((n, model.latent_size)).astype(np.float32)
    maps = model.decode_many(z, [dict(conditions)] * n, allow_extrapolation, imputed)
    return np.stack([m.map for m in maps]).std(axis=0).astype(np.float32)
