"""Likelihoods in one currency: soft-target Bernoulli NLL above its entropy floor, and importance-weighted bounds.

The training likelihood reads each in-mask voxel value ``x ∈ [0, 1]`` as the probability of "active"
and scores a prediction ``p`` by the cross-entropy ``-Σ [x log p + (1 - x) log(1 - p)]``. Its minimum
over ``p`` is the targets' own summed binary entropy ``H(x)`` (reached at ``p = x``), so a raw NLL of
"1900 nats" says little; the **excess** ``NLL - H(x) = Σ KL(Bern(x) || Bern(p)) ≥ 0`` is comparable across
models and maps. Every bound here is reported both ways.

Which bound is which: a model whose decoder sees the study's conditions bounds ``log p(x | m)``
(conditional); one without bounds ``log p(x)`` (unconditional). Compare like with like.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["bernoulli_nll", "entropy_floor", "importance_weighted_bound", "latent_free_nll"]

_EPS = 1e-6  # probabilities of latent-free models are clipped to [eps, 1 - eps]: a voxel never seen active in
# training would otherwise cost infinite nats on the first test map that has it


def entropy_floor(maps: np.ndarray) -> np.ndarray:
    """Summed binary entropy ``H(x)`` (nats) of each ``[N, V]`` soft-target map: the NLL floor."""
    x = np.clip(np.asarray(maps, dtype=np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.where(x > 0, x * np.log(x), 0.0) + np.where(x < 1, (1 - x) * np.log1p(-x), 0.0))
    return h.sum(axis=1)


def bernoulli_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft-target Bernoulli NLL of ``[B, V]`` in-mask logits against ``[B, V]`` targets, summed per map, ``[B]``.

    The same formula as ``CBVAELoss.reconstruction`` (which masks full volumes); on in-mask vectors it costs
    a quarter of the work.
    """
    return F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none").sum(1)


def latent_free_nll(prob: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """NLL (nats) of ``[N, V]`` maps under a latent-free model predicting ``prob`` (``[V]`` or ``[N, V]``).

    The training mean map is the maximum-likelihood latent-free model of this likelihood (the mean of the
    soft targets minimises the summed cross-entropy); a category mean map is its conditional version.
    """
    p = np.clip(np.asarray(prob, dtype=np.float64), _EPS, 1 - _EPS)
    x = np.asarray(maps, dtype=np.float64)
    return -(x * np.log(p) + (1 - x) * np.log1p(-p)).sum(axis=-1)


def importance_weighted_bound(
    log_likelihood: Callable[[torch.Tensor], torch.Tensor],
    mu: torch.Tensor,
    logvar: torch.Tensor,
    k: int,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The IWAE bound (Burda et al., 2016) and the ELBO from the same ``k`` posterior samples, per map.

    ``log w_j = log p(x | z_j) + log N(z_j; 0, I) - log q(z_j | x)`` with ``z_j ~ q = N(mu, exp(logvar))``;
    ``iwae = logmeanexp_j log w_j`` and ``elbo = mean_j log w_j``. By Jensen ``iwae >= elbo`` on the same
    samples, with equality for ``k = 1``; the IWAE bound tightens towards ``log p(x)`` as ``k`` grows.

    Args:
        log_likelihood: ``z [B, L] -> log p(x | z) [B]`` for the batch's maps (the decoder, conditions fixed).
        mu: ``[B, L]`` posterior means.
        logvar: ``[B, L]`` posterior log-variances.
        k: importance samples per map (>= 1).
        generator: seeded generator of the samples.

    Returns:
        ``iwae``, ``elbo`` and ``log_px_z`` (the mean reconstruction log-likelihood over samples), each ``[B]``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1 importance samples, got {k}")
    mu, logvar = mu.float(), logvar.float()
    std = torch.exp(0.5 * logvar)
    log_w, log_px = [], []
    for _ in range(k):
        eps = torch.randn(mu.shape, generator=generator).to(mu.device)
        z = mu + eps * std
        ll = log_likelihood(z).float()
        log_prior = -0.5 * (z.square() + math.log(2 * math.pi)).sum(1)
        log_q = -0.5 * (eps.square() + logvar + math.log(2 * math.pi)).sum(1)
        log_w.append(ll + log_prior - log_q)
        log_px.append(ll)
    w = torch.stack(log_w)
    return {
        "iwae": torch.logsumexp(w, 0) - math.log(k),
        "elbo": w.mean(0),
        "log_px_z": torch.stack(log_px).mean(0),
    }
