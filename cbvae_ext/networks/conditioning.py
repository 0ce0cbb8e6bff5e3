"""How conditions enter the C-β-VAE: condition groups, condition dropout, "unknown" tokens, conditional mean.

- **Groups.** The conditioning vector ``m = [meta, meta_mask]`` is a list of condition groups (a
  continuous field, the topic vector, the task one-hot), each with a slice of ``meta`` and one mask
  entry. ``groups_config(schema)`` writes them as JSON-able lists for ``network_config.json``.
- **Condition dropout** (``drop_conditions``): in training each observed group is hidden (values 0,
  mask 0) with probability ``p``, so every missing pattern is a trained input.
- **Unknown tokens** (``UnknownTokens``): a hidden categorical or vector group's values are replaced by
  a learned vector, so the network's output cannot depend on what a hidden group's values were and
  ``decode(z, c) - decode(z, c with the task hidden)`` is a task contrast. Hidden continuous fields keep
  the value ``complete_metadata`` put there (the imputation head's estimate, or the schema default).
- **Conditional mean** (``ConditionalMean``): logits ``b + U·(W·m)``, a low-rank linear map from the
  conditions to a logit volume, trained with the reconstruction likelihood and no latent. ``fit`` sets
  ``b`` to the logit of the training mean map and the task block of ``U·W`` to the training category
  means, exactly (``logit(mean_k) - logit(mean)``, rank ≥ number of categories).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn

__all__ = [
    "KINDS",
    "PRIOR_MAPS",
    "ConditionalMean",
    "UnknownTokens",
    "check_groups",
    "drop_conditions",
    "group_mask",
    "initialise_from_data",
    "groups_config",
    "logit",
    "training_means",
]

#: Kinds of condition groups (``schema.groups``).
KINDS = ("continuous", "vector", "categorical")

#: Pseudo-maps of the overall mean added to each category mean when initialising the conditional mean.
PRIOR_MAPS = 10.0

#: One group as stored in a network config: ``[name, kind, meta_start, meta_stop, mask_index]``.
GroupConfig = Sequence[Any]


def groups_config(schema: Any) -> list[list[Any]]:
    """JSON-able condition groups of a metadata schema, in mask order.

    Uses ``schema.groups`` (``.name``, ``.kind``, ``.meta_slice``, ``.mask_index``) when the schema has
    them, else the layout ``[continuous fields..., task one-hot]`` with one mask entry each.
    """
    groups = getattr(schema, "groups", None)
    if groups is not None:
        return [[g.name, g.kind, int(g.meta_slice.start), int(g.meta_slice.stop), int(g.mask_index)] for g in groups]
    c = int(schema.n_continuous)
    out: list[list[Any]] = [[f.name, "continuous", j, j + 1, j] for j, f in enumerate(schema.fields)]
    out.append(["task", "categorical", c, int(schema.meta_dim), c])
    return out


def check_groups(groups: Sequence[GroupConfig], meta_dim: int, mask_dim: int) -> None:
    for name, kind, start, stop, mask_index in groups:
        if kind not in KINDS or not (0 <= start < stop <= meta_dim) or not (0 <= mask_index < mask_dim):
            raise ValueError(
                f"condition group {name!r} ({kind}, meta[{start}:{stop}], mask[{mask_index}]) does not fit meta_dim "
                f"{meta_dim} / mask_dim {mask_dim}; rebuild the network config with preset_config()"
            )


def group_mask(groups: Sequence[GroupConfig], meta_dim: int, names: Sequence[str] | None = None) -> torch.Tensor:
    """``[n_groups, meta_dim]`` 0/1 matrix: row g marks the meta entries of group g (all groups or ``names``)."""
    out = torch.zeros(len(groups), meta_dim)
    for i, (name, _, start, stop, _) in enumerate(groups):
        if names is None or name in names:
            out[i, start:stop] = 1.0
    return out


def drop_conditions(
    meta: torch.Tensor,
    meta_mask: torch.Tensor,
    groups: Sequence[GroupConfig],
    p: float | Mapping[str, float],
    generator: torch.Generator | None = None,
    hidden: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hide each group of each row with probability ``p`` (per group name when a mapping): values 0, mask 0.

    Args:
        meta: ``[B, meta_dim]``.
        meta_mask: ``[B, mask_dim]``.
        groups: condition groups (``groups_config``).
        p: dropout probability, one for all groups or ``{group name: p}`` (absent names: 0).
        generator: random generator (the global one when None).
        hidden: ``[B, n_groups]`` bool, which groups to hide (overrides ``p``; for tests and evaluation).

    Returns:
        ``(meta, meta_mask)`` copies with the chosen groups hidden.
    """
    n = meta.shape[0]
    if hidden is None:
        probs = [float(p.get(g[0], 0.0)) if isinstance(p, Mapping) else float(p) for g in groups]
        probs_t = torch.tensor(probs, device=meta.device)
        draw = torch.rand(n, len(groups), generator=generator, device="cpu" if generator else meta.device)
        hidden = draw.to(meta.device) < probs_t
    hidden = hidden.to(meta.device)
    keep_meta = 1.0 - hidden.to(meta.dtype) @ group_mask(groups, meta.shape[1]).to(meta)
    keep_mask = torch.ones_like(meta_mask)
    index = torch.tensor([g[4] for g in groups], device=meta.device)
    keep_mask[:, index] = 1.0 - hidden.to(meta_mask.dtype)
    return meta * keep_meta.clamp_min(0.0), meta_mask * keep_mask


class UnknownTokens(nn.Module):
    """Replace the values of hidden categorical/vector groups in ``m = [meta, meta_mask]`` by learned tokens.

    Tokens start at 0 (an all-zero one-hot, what the data loader stores for a missing task), so an
    untrained model behaves as before.

    Args:
        groups: condition groups (``groups_config``).
        meta_dim: length of ``meta``.
    """

    def __init__(self, groups: Sequence[GroupConfig], meta_dim: int) -> None:
        super().__init__()
        self.meta_dim = meta_dim
        tokenised = [g for g in groups if g[1] != "continuous"]
        self.names = [g[0] for g in tokenised]
        self.token = nn.Parameter(torch.zeros(meta_dim))
        self.register_buffer("members", group_mask(tokenised, meta_dim), persistent=False)
        self.register_buffer("mask_index", torch.tensor([g[4] for g in tokenised], dtype=torch.long), persistent=False)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        if not self.names:
            return m
        meta, mask = m[:, : self.meta_dim], m[:, self.meta_dim :]
        hidden = (1.0 - mask[:, self.mask_index]) @ self.members  # [B, meta_dim]: 1 where a hidden group's value
        meta = meta * (1.0 - hidden) + self.token.to(meta.dtype) * hidden
        return torch.cat([meta, mask], dim=1)


def logit(p: np.ndarray | torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """``log(p / (1 - p))`` with ``p`` clipped to ``[eps, 1 - eps]``."""
    p = torch.as_tensor(np.asarray(p) if not torch.is_tensor(p) else p).double().clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


class ConditionalMean(nn.Module):
    """Logit volume ``b + U·(W·m)`` of the conditions alone: the model's conditional mean map, in logits.

    Args:
        cond_dim: length of ``m`` (0: just the bias volume, an unconditional mean map).
        spatial_shape: output grid ``(D, H, W)``.
        rank: rank of ``U·W`` (ignored when ``cond_dim`` is 0).
    """

    def __init__(self, cond_dim: int, spatial_shape: Sequence[int], rank: int) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in spatial_shape)
        n_vox = int(np.prod(self.shape))
        self.bias = nn.Parameter(torch.zeros(n_vox))
        self.rank = int(rank) if cond_dim else 0
        self.proj = nn.Linear(cond_dim, self.rank, bias=False) if self.rank else None
        # basis entries O(1) and projection at 0: Adam's per-parameter steps move logits by ~lr at first
        self.basis = nn.Parameter(torch.randn(self.rank, n_vox)) if self.rank else None
        if self.proj is not None:
            nn.init.zeros_(self.proj.weight)

    def forward(self, m: torch.Tensor | None) -> torch.Tensor:
        n = 1 if m is None else m.shape[0]
        out = self.bias.expand(n, -1)
        if self.proj is not None and m is not None:
            out = out + self.proj(m.to(self.bias.dtype)) @ self.basis
        return out.reshape(n, 1, *self.shape)

    @torch.no_grad()
    def fit(
        self,
        mean_map: np.ndarray | torch.Tensor,
        category_means: np.ndarray | torch.Tensor | None = None,
        columns: Sequence[int] | None = None,
    ) -> None:
        """Initialise from training means (probabilities in [0, 1]).

        ``bias = logit(mean_map)``; with ``category_means [K, D, H, W]`` and the K columns of ``m`` that
        hold the one-hot, ``U·W`` maps one-hot k to ``logit(category_means[k]) - logit(mean_map)``
        exactly when ``rank >= K`` (SVD; the best rank-``rank`` fit otherwise). Other columns start at 0.
        """
        base = logit(mean_map).flatten()
        self.bias.copy_(base.to(self.bias))
        if self.proj is None or category_means is None or columns is None:
            return
        delta = logit(category_means).flatten(1) - base  # [K, V]
        a, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(self.rank, len(s))
        scale = float(np.sqrt(delta.shape[1]))
        self.basis[:r] = (vh[:r] * scale).to(self.basis)
        weight = torch.zeros_like(self.proj.weight, dtype=torch.float64)
        weight[:r, list(columns)] = (a[:, :r] * s[:r] / scale).T
        self.proj.weight.copy_(weight.to(self.proj.weight))


def training_means(dataset_dir: Any, chunk: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean map [D, H, W], category means [K, D, H, W], category counts [K])`` of the training split.

    Maps are scaled to [0, 1] by their peak as in training; a category without training maps gets the
    overall mean.
    """
    from cbvae_ext.data import load_dataset_info

    info = load_dataset_info(dataset_dir)
    rows = info.rows("train")
    cats = info.category_index(rows)
    k = info.schema.n_categories
    sums = np.zeros((k + 1, *info.mask.shape), np.float64)  # last row: unknown category
    counts = np.zeros(k + 1, np.int64)
    for start in range(0, len(rows), chunk):
        idx = rows[start : start + chunk]
        maps = np.asarray(info.maps[idx], dtype=np.float32)
        maps /= np.maximum(maps.reshape(len(idx), -1).max(1), np.finfo(np.float32).tiny)[:, None, None, None]
        c = cats[start : start + chunk]
        np.add.at(sums, np.where(c >= 0, c, k), maps)
        counts += np.bincount(np.where(c >= 0, c, k), minlength=k + 1)
    mean = sums.sum(0) / max(counts.sum(), 1)
    cat_means = np.where(
        counts[:k, None, None, None] > 0, sums[:k] / np.maximum(counts[:k], 1)[:, None, None, None], mean
    )
    return mean.astype(np.float32), cat_means.astype(np.float32), counts[:k]


def initialise_from_data(network: nn.Module, dataset_dir: Any) -> nn.Module:
    """Set a network's conditional-mean path from the training split's mean maps (see ``ConditionalMean.fit``).

    A network without the path is returned unchanged; a checkpoint loaded later overwrites the values.
    """
    from cbvae_ext.networks import unwrap

    model = unwrap(network)
    path = getattr(model, "cond_mean", None)
    if path is None:
        return network
    mean, cat_means, counts = training_means(dataset_dir)
    w = (counts / (counts + PRIOR_MAPS))[:, None, None, None]
    cat_means = w * cat_means + (1.0 - w) * mean
    task = [g for g in getattr(model, "groups", []) if g[0] == "task"]
    columns = list(range(task[0][2], task[0][3])) if task and path.rank else None
    device = path.bias.device
    path.fit(mean, cat_means if columns else None, columns)
    path.to(device)
    return network
