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
    "ConditionalMean",
    "UnknownTokens",
    "check_groups",
    "drop_conditions",
    "group_mask",
    "initialise_from_data",
    "groups_config",
    "fit_ridge",
    "logit",
]

#: Kinds of condition groups (``schema.groups``).
KINDS = ("continuous", "vector", "categorical")

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

    def forward(self, m: torch.Tensor, token: bool = True) -> torch.Tensor:
        """``m`` with hidden groups' values replaced by their token (``token=False``: by 0)."""
        if not self.names:
            return m
        meta, mask = m[:, : self.meta_dim], m[:, self.meta_dim :]
        hidden = (1.0 - mask[:, self.mask_index]) @ self.members  # [B, meta_dim]: 1 where a hidden group's value
        meta = meta * (1.0 - hidden)
        if token:
            meta = meta + self.token.to(meta.dtype) * hidden
        return torch.cat([meta, mask], dim=1)


def logit(p: np.ndarray | torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """``log(p / (1 - p))`` with ``p`` clipped to ``[eps, 1 - eps]``."""
    p = torch.as_tensor(np.asarray(p) if not torch.is_tensor(p) else p).double().clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


class ConditionalMean(nn.Module):
    """Conditional mean map ``p(m) = b + U·(W·m)`` (clipped to ``[eps, 1 - eps]``), returned as logits.

    Everything is a buffer (saved with the model, never trained): ``fit`` sets it.

    Args:
        cond_dim: length of ``m`` (0: just the intercept volume, an unconditional mean map).
        spatial_shape: output grid ``(D, H, W)``.
        rank: rank of ``U·W`` (ignored when ``cond_dim`` is 0).
        eps: probability clip before the logit.
    """

    def __init__(self, cond_dim: int, spatial_shape: Sequence[int], rank: int, eps: float = 1e-4) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in spatial_shape)
        self.eps = float(eps)
        n_vox = int(np.prod(self.shape))
        self.rank = min(int(rank), cond_dim) if cond_dim else 0
        self.register_buffer("intercept", torch.full((n_vox,), 0.5))  # logit 0 until fitted
        self.register_buffer("weight", torch.zeros(self.rank, cond_dim))
        self.register_buffer("basis", torch.zeros(self.rank, n_vox))

    def forward(self, m: torch.Tensor | None) -> torch.Tensor:
        n = 1 if m is None else m.shape[0]
        p = self.intercept.expand(n, -1)
        if self.rank and m is not None:
            p = p + (m.to(self.weight.dtype) @ self.weight.T) @ self.basis
        p = p.clamp(self.eps, 1.0 - self.eps)
        return (torch.log(p) - torch.log1p(-p)).reshape(n, 1, *self.shape)

    @torch.no_grad()
    def fit(self, intercept: np.ndarray | torch.Tensor, coef: np.ndarray | torch.Tensor | None = None) -> None:
        """Set ``p(m) = intercept + m·coef`` (``intercept [D, H, W]``, ``coef [cond_dim, D, H, W]``).

        ``coef`` is stored as its best rank-``rank`` approximation (SVD), exact when ``rank`` is at least
        its rank.
        """
        self.intercept.copy_(torch.as_tensor(np.asarray(intercept)).flatten().to(self.intercept))
        if not self.rank or coef is None:
            return
        coef = torch.as_tensor(np.asarray(coef)).double().flatten(1)
        a, s, vh = torch.linalg.svd(coef, full_matrices=False)
        r = min(self.rank, len(s))
        self.weight.zero_()
        self.basis.zero_()
        self.weight[:r] = (a[:, :r] * s[:r]).T.to(self.weight)
        self.basis[:r] = vh[:r].to(self.basis)


def fit_ridge(
    x_train: np.ndarray,
    y_train: Any,
    x_val: np.ndarray,
    y_val: Any,
    alphas: Sequence[float] = tuple(10.0 ** np.arange(-1, 8)),
    chunk: int = 512,
) -> tuple[np.ndarray, np.ndarray, float, dict[float, float]]:
    """Ridge regression of maps on conditions, the penalty chosen by validation mean squared error.

    Features are standardised (constant columns dropped), the intercept is not penalised. ``y_*`` are
    callables ``rows -> [len(rows), V]`` float arrays, so the maps are read in chunks.

    Returns:
        ``(intercept [V], coef [n_features, V], alpha, {alpha: validation MSE})``.
    """
    n, d = x_train.shape
    mu, sd = x_train.mean(0), x_train.std(0)
    keep = sd > 1e-8
    xs = np.zeros_like(x_train)
    xs[:, keep] = (x_train[:, keep] - mu[keep]) / sd[keep]
    gram = xs.T @ xs
    xty, ysum = None, None
    for start in range(0, n, chunk):
        rows = np.arange(start, min(start + chunk, n))
        y = np.asarray(y_train(rows), dtype=np.float64)
        xty = xs[rows].T @ y if xty is None else xty + xs[rows].T @ y
        ysum = y.sum(0) if ysum is None else ysum + y.sum(0)
    ybar = ysum / n
    xv = np.zeros_like(x_val)
    xv[:, keep] = (x_val[:, keep] - mu[keep]) / sd[keep]
    yv = np.asarray(y_val(np.arange(len(x_val))), dtype=np.float64)
    scores, coefs = {}, {}
    for alpha in alphas:
        b = np.linalg.solve(gram + alpha * np.eye(d), xty)  # xs is centred, so xty needs no centring
        scores[float(alpha)] = float(((ybar + xv @ b - yv) ** 2).mean())
        coefs[float(alpha)] = b
    best = min(scores, key=scores.get)
    coef = np.zeros_like(coefs[best])
    coef[keep] = coefs[best][keep] / sd[keep, None]
    return ybar - mu @ coef, coef, best, scores


def initialise_from_data(network: nn.Module, dataset_dir: Any, seed: int = 0) -> nn.Module:
    """Fit a network's conditional-mean path on the dataset's training split (see ``ConditionalMean``).

    The intercept-only path (baseline, conditioning-off twin) gets the training mean map. Otherwise the
    training rows enter twice, each condition group hidden with the network's condition-dropout
    probability (the network's own view ``cond_mean_input``), and ``fit_ridge`` picks the penalty on
    the validation split with every condition given. A network without the path is returned unchanged;
    a checkpoint loaded later overwrites the fit.
    """
    from cbvae_ext.data import load_dataset_info, normalise_maps
    from cbvae_ext.networks import unwrap

    model = unwrap(network)
    path = getattr(model, "cond_mean", None)
    if path is None:
        return network
    info = load_dataset_info(dataset_dir)
    mask = info.mask.astype(bool)
    train, val = info.rows("train"), info.rows("val")

    def maps(rows: np.ndarray) -> np.ndarray:
        return normalise_maps(np.asarray(info.maps[rows], dtype=np.float32)).numpy()[:, mask]

    intercept = np.zeros(mask.shape, np.float32)
    if not path.rank:
        total = sum(maps(train[s : s + 512]).sum(0, dtype=np.float64) for s in range(0, len(train), 512))
        intercept[mask] = total / len(train)
        path.fit(intercept)
        return network
    gen = torch.Generator().manual_seed(seed)

    def conditions(rows: np.ndarray, drop: bool) -> np.ndarray:
        meta, meta_mask = (torch.from_numpy(a) for a in info.encode(rows))
        if drop:
            meta, meta_mask = drop_conditions(meta, meta_mask, model.groups, model.condition_dropout, gen)
        with torch.no_grad():
            m = model.cond_mean_input(torch.cat([meta, meta_mask], dim=1).to(path.intercept.device))
        return m.double().cpu().numpy()

    replicas = 2 if model.condition_dropout else 1
    x_train = np.concatenate([conditions(train, replicas > 1) for _ in range(replicas)])
    rows = np.concatenate([train] * replicas)
    b0, coef, alpha, _ = fit_ridge(x_train, lambda r: maps(rows[r]), conditions(val, False), lambda r: maps(val[r]))
    intercept[mask] = b0
    full = np.zeros((coef.shape[0], *mask.shape), np.float32)
    full[:, mask] = coef
    path.fit(intercept, full)
    path.alpha = alpha
    return network
