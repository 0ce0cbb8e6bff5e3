"""How conditions enter the C-β-VAE: condition groups, condition dropout, "unknown" tokens, conditional mean.

- **Groups.** The conditioning vector ``m = [meta, meta_mask]`` is a list of condition groups
  (``schema.ConditionGroup``: a continuous field, the topic vector, the task one-hot), each with a slice of
  ``meta`` and one mask entry. ``groups_config(schema)`` writes them as JSON-able lists for
  ``network_config.json``; ``as_groups`` reads them back.
- **Hiding a group** (``hide_groups``): values 0, mask 0, exactly what a study without that metadata looks
  like. **Condition dropout** (``drop_conditions``): in training each observed group is hidden with
  probability ``p``, so every missing pattern is a trained input.
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

from cbvae_ext.schema import ConditionGroup, MetadataSchema

__all__ = [
    "KINDS",
    "ConditionGroup",
    "ConditionalMean",
    "UnknownTokens",
    "as_groups",
    "check_groups",
    "drop_conditions",
    "dropout_probabilities",
    "group_mask",
    "groups_config",
    "hide_groups",
    "initialise_from_data",
    "fit_ridge",
    "logit",
]

#: Kinds of condition groups (``schema.groups``).
KINDS = ("continuous", "vector", "categorical")


def groups_config(schema: MetadataSchema) -> list[list[Any]]:
    """JSON-able condition groups of a metadata schema, in mask order (``ConditionGroup.to_config``)."""
    return [g.to_config() for g in schema.groups]


def as_groups(groups: Sequence[ConditionGroup | Sequence[Any]]) -> list[ConditionGroup]:
    """Condition groups from their JSON form (``network_config.json``) or as they are."""
    return [ConditionGroup.from_config(g) for g in groups]


def check_groups(groups: Sequence[ConditionGroup], meta_dim: int, mask_dim: int) -> None:
    for g in groups:
        start, stop = g.meta_slice.start, g.meta_slice.stop
        if g.kind not in KINDS or not (0 <= start < stop <= meta_dim) or not (0 <= g.mask_index < mask_dim):
            raise ValueError(
                f"condition group {g.name!r} ({g.kind}, meta[{start}:{stop}], mask[{g.mask_index}]) does not fit "
                f"meta_dim {meta_dim} / mask_dim {mask_dim}; rebuild the network config with preset_config()"
            )


def group_mask(groups: Sequence[ConditionGroup], meta_dim: int) -> torch.Tensor:
    """``[n_groups, meta_dim]`` 0/1 matrix: row g marks the meta entries of group g."""
    out = torch.zeros(len(groups), meta_dim)
    for i, g in enumerate(groups):
        out[i, g.meta_slice] = 1.0
    return out


def hide_groups(
    meta: torch.Tensor,
    meta_mask: torch.Tensor,
    groups: Sequence[ConditionGroup],
    hidden: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of ``(meta, meta_mask)`` with groups hidden: values 0, mask 0 -- what a study without them looks like.

    The one way a condition is hidden: condition dropout (``drop_conditions``), the conditional-mean fit
    and the evaluation's hidden-condition reconstructions all call it.

    Args:
        meta: ``[B, meta_dim]``.
        meta_mask: ``[B, mask_dim]``.
        groups: condition groups (``schema.groups`` or a subset).
        hidden: ``[B, len(groups)]`` (or ``[len(groups)]``, the same for every row) bool, which of ``groups``
            to hide; None: every group in ``groups``.
    """
    if hidden is None:
        hidden = torch.ones(len(groups), dtype=torch.bool)
    hidden = hidden.to(meta.device).expand(meta.shape[0], len(groups))
    keep_meta = 1.0 - hidden.to(meta.dtype) @ group_mask(groups, meta.shape[1]).to(meta)
    keep_mask = torch.ones_like(meta_mask)
    index = torch.tensor([g.mask_index for g in groups], dtype=torch.long, device=meta.device)
    keep_mask[:, index] = 1.0 - hidden.to(meta_mask.dtype)
    return meta * keep_meta.clamp_min(0.0), meta_mask * keep_mask


def dropout_probabilities(groups: Sequence[ConditionGroup], p: float | Mapping[str, float]) -> torch.Tensor:
    """``[len(groups)]`` probability of hiding each group: ``p``, or ``p[name]`` per group (absent names: 0)."""
    return torch.tensor([float(p.get(g.name, 0.0)) if isinstance(p, Mapping) else float(p) for g in groups])


def drop_conditions(
    meta: torch.Tensor,
    meta_mask: torch.Tensor,
    groups: Sequence[ConditionGroup],
    p: float | Mapping[str, float],
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Condition dropout: hide each group of each row with probability ``p`` (``hide_groups``).

    Args:
        meta: ``[B, meta_dim]``.
        meta_mask: ``[B, mask_dim]``.
        groups: condition groups (``schema.groups``).
        p: dropout probability, one for all groups or ``{group name: p}`` (absent names: 0).
        generator: random generator (the global one when None).

    Returns:
        ``(meta, meta_mask)`` copies with the drawn groups hidden.
    """
    draw = torch.rand(meta.shape[0], len(groups), generator=generator, device="cpu" if generator else meta.device)
    hidden = draw.to(meta.device) < dropout_probabilities(groups, p).to(meta.device)
    return hide_groups(meta, meta_mask, groups, hidden)


class UnknownTokens(nn.Module):
    """Replace the values of hidden categorical/vector groups in ``m = [meta, meta_mask]`` by learned tokens.

    Tokens start at 0 (an all-zero one-hot, what the data loader stores for a missing task), so an
    untrained model behaves as before.

    Args:
        groups: condition groups (``schema.groups``).
        meta_dim: length of ``meta``.
    """

    def __init__(self, groups: Sequence[ConditionGroup], meta_dim: int) -> None:
        super().__init__()
        self.meta_dim = meta_dim
        tokenised = [g for g in groups if g.kind != "continuous"]
        self.names = [g.name for g in tokenised]
        self.token = nn.Parameter(torch.zeros(meta_dim))
        self.register_buffer("members", group_mask(tokenised, meta_dim), persistent=False)
        self.register_buffer(
            "mask_index", torch.tensor([g.mask_index for g in tokenised], dtype=torch.long), persistent=False
        )

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
    """Conditional mean map ``p(m) = b + U·(W·m) + m[exact]·E`` (clipped to ``[eps, 1 - eps]``), returned as logits.

    Everything is a buffer (saved with the model, never trained): ``fit`` sets it.

    Args:
        cond_dim: length of ``m`` (0: just the intercept volume, an unconditional mean map).
        spatial_shape: output grid ``(D, H, W)``.
        rank: rank of ``U·W`` (ignored when ``cond_dim`` is 0).
        eps: probability clip before the logit.
        exact: indices of ``m`` whose coefficient maps ``E`` are stored as fitted, outside the rank-``rank``
            approximation (the text embedding fitted on the path's residual; ``architecture.md``, "Text
            condition", measures it against the truncation).

    Attributes:
        fast: one ``addmm`` and one ``logit`` pass over the grid (``dense3d.set_fast_path``); False: the
            plain ``mm``, add, clip, ``log - log1p``.
    """

    fast = True

    def __init__(
        self, cond_dim: int, spatial_shape: Sequence[int], rank: int, eps: float = 1e-4, exact: Sequence[int] = ()
    ) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in spatial_shape)
        self.eps = float(eps)
        n_vox = int(np.prod(self.shape))
        self.rank = min(int(rank), cond_dim) if cond_dim else 0
        exact = [int(i) for i in exact] if cond_dim else []
        if any(not 0 <= i < cond_dim for i in exact) or len(set(exact)) != len(exact):
            raise ValueError(f"exact indices {exact} must be distinct entries of the {cond_dim} conditions")
        self.register_buffer("intercept", torch.full((n_vox,), 0.5))  # logit 0 until fitted
        self.register_buffer("weight", torch.zeros(self.rank, cond_dim))
        # rows [:rank] the low-rank basis, rows [rank:] the exact entries' maps: one addmm serves both
        # (two chained addmm failed shape propagation in a frozen TorchScript trace)
        self.register_buffer("basis", torch.zeros(self.rank + len(exact), n_vox))
        self.register_buffer("exact_index", torch.tensor(exact, dtype=torch.long), persistent=False)

    @property
    def exact_coef(self) -> torch.Tensor:
        """``[len(exact), V]`` the exact entries' coefficient maps."""
        return self.basis[self.rank :]

    def coefficients(self) -> torch.Tensor:
        """``[cond_dim, V]`` the stored ``coef`` of ``p(m) = intercept + m·coef`` (low-rank part plus exact rows)."""
        coef = self.weight.T @ self.basis[: self.rank]
        coef[self.exact_index] += self.exact_coef
        return coef

    def forward(self, m: torch.Tensor | None) -> torch.Tensor:
        n = 1 if m is None else m.shape[0]
        p = self.intercept.expand(n, -1)
        h = None
        if len(self.basis) and m is not None:
            m = m.to(self.weight.dtype)
            h = m @ self.weight.T
            if len(self.exact_index):
                h = torch.cat([h, m.index_select(1, self.exact_index)], dim=1)
        if self.fast:  # one fused pass each (addmm; logit with its clip): this runs on the grid every step
            if h is not None:
                p = torch.addmm(self.intercept, h, self.basis)
            return torch.logit(p, self.eps).reshape(n, 1, *self.shape)
        if h is not None:
            p = p + h @ self.basis
        p = p.clamp(self.eps, 1.0 - self.eps)
        return (torch.log(p) - torch.log1p(-p)).reshape(n, 1, *self.shape)

    @torch.no_grad()
    def fit(self, intercept: np.ndarray | torch.Tensor, coef: np.ndarray | torch.Tensor | None = None) -> None:
        """Set ``p(m) = intercept + m·coef`` (``intercept [D, H, W]``, ``coef [cond_dim, D, H, W]``).

        The rows of ``coef`` at the ``exact`` indices are stored as they are (``exact_coef``, the last rows of
        ``basis``). The rest is stored as its best rank-``rank`` approximation (``weight`` the left singular
        vectors times the singular values, ``basis`` the right singular vectors), exact when ``rank`` is at
        least its rank.
        The singular vectors come from the eigendecomposition of ``coef · coefᵀ`` (``cond_dim²``, in float64):
        ``torch.linalg.svd`` of the wide ``[cond_dim, V]`` matrix took 10 s of a tiny training's 28 s on one
        CPU thread, this a fraction of a second; directions whose singular value is below ``1e-7`` of the
        largest (float64 rounding of the Gram matrix) are left out.
        """
        self.intercept.copy_(torch.as_tensor(np.asarray(intercept)).flatten().to(self.intercept))
        if coef is None or not len(self.basis):
            return
        coef = torch.as_tensor(np.asarray(coef)).double().flatten(1).clone()
        self.basis[self.rank :] = coef[self.exact_index].to(self.basis)
        coef[self.exact_index] = 0.0
        if not self.rank:
            return
        eigenvalues, vectors = torch.linalg.eigh(coef @ coef.T)  # ascending
        s = eigenvalues.flip(0).clamp_min(0.0).sqrt()[: self.rank]
        a = vectors.flip(1)[:, : self.rank]
        r = int((s > 1e-7 * s[0]).sum()) if len(s) and s[0] > 0 else 0
        self.weight.zero_()
        self.basis[: self.rank] = 0.0
        self.weight[:r] = (a[:, :r] * s[:r]).T.to(self.weight)
        self.basis[:r] = ((a[:, :r].T @ coef) / s[:r, None]).to(self.basis)


def fit_ridge(
    x_train: np.ndarray,
    y_train: Any,
    x_val: Sequence[np.ndarray],
    y_val: Any,
    penalties: Sequence[np.ndarray],
    chunk: int = 512,
    voxel_step: int = 4,
    criterion: Any = None,
) -> tuple[np.ndarray, np.ndarray, int, list[float]]:
    """Ridge regression of maps on conditions, the per-feature penalty chosen on validation.

    Features are standardised (constant columns dropped), the intercept is not penalised. ``y_*`` are
    callables ``rows -> [len(rows), V]`` float arrays, so the maps are read in chunks. Each candidate in
    ``penalties`` is a vector of per-feature penalties; the one with the smallest validation mean squared
    error, averaged over the condition sets ``x_val`` (each ``[n_val, n_features]`` for the same maps,
    e.g. all conditions given and the task alone) on every ``voxel_step``-th voxel, wins; ``criterion``
    (``(predictions per condition set, validation maps) -> score``, smaller is better) replaces that rule.

    Returns:
        ``(intercept [V], coef [n_features, V], index of the chosen penalty, validation MSE per candidate)``.
    """
    n, d = x_train.shape
    mu, sd = x_train.mean(0), x_train.std(0)
    keep = sd > 1e-8

    def standard(x: np.ndarray) -> np.ndarray:
        out = np.zeros_like(x, dtype=np.float64)
        out[:, keep] = (x[:, keep] - mu[keep]) / sd[keep]
        return out

    xs = standard(x_train)
    gram = xs.T @ xs
    xty, ysum = None, None
    for start in range(0, n, chunk):
        rows = np.arange(start, min(start + chunk, n))
        y = np.asarray(y_train(rows), dtype=np.float64)
        xty = xs[rows].T @ y if xty is None else xty + xs[rows].T @ y
        ysum = y.sum(0) if ysum is None else ysum + y.sum(0)
    ybar = ysum / n
    yv = np.asarray(y_val(np.arange(len(x_val[0]))), dtype=np.float64)[:, ::voxel_step]
    xvs = [standard(x) for x in x_val]
    scores = []
    xty_val = xty[:, ::voxel_step]
    few_rows = sum(len(x) for x in xvs) < d  # then solve for the validation rows, not the voxels: fewer columns
    for pen in penalties:
        a = gram + np.diag(np.asarray(pen, dtype=np.float64)) + 1e-9 * np.eye(d)  # symmetric
        if few_rows:
            preds = [ybar[::voxel_step] + np.linalg.solve(a, xv.T).T @ xty_val for xv in xvs]
        else:
            b = np.linalg.solve(a, xty_val)
            preds = [ybar[::voxel_step] + xv @ b for xv in xvs]
        if criterion is not None:
            scores.append(float(criterion(preds, yv)))
        else:
            scores.append(float(np.mean([((p - yv) ** 2).mean() for p in preds])))
    best = int(np.argmin(scores))
    b = np.linalg.solve(gram + np.diag(np.asarray(penalties[best], dtype=np.float64)) + 1e-9 * np.eye(d), xty)
    coef = np.zeros_like(b)
    coef[keep] = b[keep] / sd[keep, None]
    return ybar - mu @ coef, coef, best, scores


def initialise_from_data(
    network: nn.Module,
    dataset_dir: Any,
    seed: int = 0,
    identify_task: bool = True,
    vector_hidden_replica: bool = False,
    rows: Mapping[str, np.ndarray] | None = None,
    hidden_groups: Sequence[str] = (),
    own_penalty: Sequence[str] = (),
    own_penalty_by: str = "mse",
    residual_groups: Sequence[str] = ("terms",),
) -> nn.Module:
    """Fit a network's conditional-mean path on the dataset's training split (see ``ConditionalMean``).

    The intercept-only path (baseline, conditioning-off twin) gets the training mean map. Otherwise the
    training rows enter twice, each condition group hidden with the network's condition-dropout
    probability (the network's own view ``cond_mean_input``), and ``fit_ridge`` picks the penalty on
    the validation split. The penalty has two strengths, one for the categorical groups (the task
    one-hot) and one for the rest (year, ..., the 50 topic weights), chosen together on the validation
    maps with every condition given and with the task alone (the app's two main queries), so neither
    the topics' many weights nor the few maps of a small category set the other's shrinkage. With
    ``identify_task`` the task strength is then re-chosen (the other kept) by category identification of
    the task-alone map on validation (its best-matching validation category mean is its own), ties by
    MSE: squared error alone pulls every category map to the mean map on a 1k split. A network
    without the path is returned unchanged; a checkpoint loaded later overwrites the fit. ``rows``
    (``{"train": ..., "val": ...}``, dataset rows) replaces the dataset's splits, e.g. to refit without
    some studies (the evaluation's unseen term pairs). ``hidden_groups`` are hidden on every row, as if the
    dataset lacked them (an ablation, ``scripts/ablate_text.py``). ``own_penalty`` groups (e.g. ``"terms"``)
    get a third strength, chosen after the other two (which are kept) by validation MSE, or with
    ``own_penalty_by="peak_auc"`` by the validation peak AUC of the all-given maps (the two disagree
    about text features, ``architecture.md``), instead of sharing the fields' and topics' strength.
    ``residual_groups`` (vector groups, e.g. ``"terms"``) are left out of that fit and then fitted to its
    residual on the training rows that have them (their own strength by validation MSE; their observed
    flag carries the residual's intercept), so the path stays one linear layer and a row without them
    gets exactly the path fitted without them. The default fits the text embedding so: in the one ridge
    it lowered full-v7 test peak AUC (-0.005), on the residual it raises it (+0.004, ``architecture.md``).
    """
    if own_penalty_by not in ("mse", "peak_auc"):
        raise ValueError(f"own_penalty_by must be 'mse' or 'peak_auc', got {own_penalty_by!r}")
    from cbvae_ext.data import load_dataset_info, normalise_maps
    from cbvae_ext.networks import unwrap

    model = unwrap(network)
    path = getattr(model, "cond_mean", None)
    if path is None:
        return network
    info = load_dataset_info(dataset_dir)
    mask = info.mask.astype(bool)
    train, val = (info.rows("train"), info.rows("val")) if rows is None else (rows["train"], rows["val"])

    def maps(rows: np.ndarray) -> np.ndarray:
        return normalise_maps(np.asarray(info.maps[rows], dtype=np.float32)).numpy()[:, mask]

    intercept = np.zeros(mask.shape, np.float32)
    if not path.rank:
        total = sum(maps(train[s : s + 512]).sum(0, dtype=np.float64) for s in range(0, len(train), 512))
        intercept[mask] = total / len(train)
        path.fit(intercept)
        return network
    gen = torch.Generator().manual_seed(seed)

    given = torch.tensor([g.name in hidden_groups for g in model.groups])
    residual_groups = [g.name for g in model.groups if g.name in residual_groups and g.name not in hidden_groups]
    absent = given | torch.tensor([g.name in residual_groups for g in model.groups])

    def conditions(
        rows: np.ndarray, drop: bool, hidden: torch.Tensor | None = None, absent: torch.Tensor = absent
    ) -> np.ndarray:
        meta, meta_mask = (torch.from_numpy(a) for a in info.encode(rows))
        if absent.any():
            meta, meta_mask = hide_groups(meta, meta_mask, model.groups, absent.expand(len(rows), -1))
        if hidden is not None:
            meta, meta_mask = hide_groups(meta, meta_mask, model.groups, hidden)
        elif drop:
            meta, meta_mask = drop_conditions(meta, meta_mask, model.groups, model.condition_dropout, gen)
        with torch.no_grad():
            m = model.cond_mean_input(torch.cat([meta, meta_mask], dim=1).to(path.intercept.device))
        return m.double().cpu().numpy()

    replicas = 2 if model.condition_dropout else 1
    x_parts = [conditions(train, replicas > 1) for _ in range(replicas)]
    if replicas > 1 and vector_hidden_replica:
        # the second replica has every vector group hidden, so the "topics unknown" inputs (the task-alone map)
        # are fitted on every training row, not on the ~30 % the dropout happens to hide
        draw = torch.rand(len(train), len(model.groups), generator=gen)
        hide = draw < dropout_probabilities(model.groups, model.condition_dropout)
        hide[:, [i for i, g in enumerate(model.groups) if g.kind == "vector"]] = True
        x_parts[1] = conditions(train, False, hide)
    x_train = np.concatenate(x_parts)
    rows = np.concatenate([train] * replicas)
    # the task one-hot and the observed flags take one strength, the fields and topic weights the other
    categorical = np.zeros(model.encoder_keep.numel(), bool)
    categorical[model.meta_dim :] = True
    for g in model.groups:
        categorical[g.meta_slice] = g.kind == "categorical"
    categorical = np.tile(categorical, x_train.shape[1] // len(categorical))
    own = np.zeros(model.encoder_keep.numel(), bool)
    for g in model.groups:
        own[g.meta_slice] = g.name in own_penalty
    own = np.tile(own, x_train.shape[1] // len(own))

    def penalty(a: float, c: float, t: float | None = None) -> np.ndarray:
        """Per-feature penalties: ``c`` for the categorical entries, ``t`` for ``own_penalty`` groups, else ``a``."""
        out = np.where(categorical, c, a)
        return out if t is None else np.where(own, t, out)

    candidates = [(a, c) for a in 10.0 ** np.arange(1, 7) for c in 10.0 ** np.arange(0, 6)]
    penalties = [penalty(a, c) for a, c in candidates]
    task_only = torch.tensor([g.name != "task" for g in model.groups]).expand(len(val), -1)
    val_sets = [conditions(val, False), conditions(val, False, task_only)]
    b0, coef, best, _ = fit_ridge(x_train, lambda r: maps(rows[r]), val_sets, lambda r: maps(val[r]), penalties)
    alpha = candidates[best]
    if own.any():
        strengths = 10.0 ** np.arange(0, 7)
        own_penalties = [penalty(*alpha, t) for t in strengths]
        b0, coef, best, _ = fit_ridge(
            x_train,
            lambda r: maps(rows[r]),
            val_sets,
            lambda r: maps(val[r]),
            own_penalties,
            criterion=_peak_auc_score if own_penalty_by == "peak_auc" else None,
        )
        alpha = (*alpha, float(strengths[best]))
    if identify_task:
        # the MSE choice shrinks a small category's map to the mean map, so a task alone names no category;
        # the task penalty is re-chosen by how many validation categories the task-alone map identifies
        # (ties: the MSE), the other penalty kept
        labels = info.category_index(val)
        task_candidates = [(a, c, *alpha[2:]) for a, c in candidates if a == alpha[0]]
        task_penalties = [penalty(*p) for p in task_candidates]
        b0, coef, best, _ = fit_ridge(
            x_train,
            lambda r: maps(rows[r]),
            val_sets,
            lambda r: maps(val[r]),
            task_penalties,
            criterion=lambda preds, yv: _identification_score(preds, yv, labels),
        )
        alpha = task_candidates[best]
    for g in (g for g in model.groups if g.name in residual_groups):
        view = {"train": train, "val": val}
        for part, part_rows in view.items():
            view[part] = part_rows[info.encode(part_rows)[1][:, g.mask_index] > 0]
        if not len(view["train"]) or not len(view["val"]):
            continue
        cols, flag = np.arange(g.meta_slice.start, g.meta_slice.stop), model.meta_dim + g.mask_index
        base = {k: conditions(r, False) for k, r in view.items()}
        full = {k: conditions(r, False, absent=given) for k, r in view.items()}

        def residual(part: str, r: np.ndarray, view=view, base=base, coef=coef) -> np.ndarray:
            return maps(view[part][r]) - (b0 + base[part][r] @ coef)

        strengths = 10.0 ** np.arange(0, 7)
        b2, c2, best, _ = fit_ridge(
            full["train"][:, cols],
            lambda r: residual("train", r),
            [full["val"][:, cols]],
            lambda r: residual("val", r),
            [np.full(len(cols), t) for t in strengths],
        )
        coef[cols] += c2
        coef[flag] += b2 / full["train"][0, flag]  # the flag's value on every row that has the group
        alpha = (*alpha, float(strengths[best]))
    intercept[mask] = b0
    full = np.zeros((coef.shape[0], *mask.shape), np.float32)
    full[:, mask] = coef
    path.fit(intercept, full)
    path.alpha = alpha
    return network


def _peak_auc_score(preds: Sequence[np.ndarray], y_val: np.ndarray) -> float:
    """``-(mean validation peak AUC)`` of the all-given predictions (``preds[0]``; maps without a sampled peak skipped)."""
    from cbvae_ext.evaluation.metrics import peak_auc

    return -float(np.nanmean(peak_auc(preds[0], y_val >= 1.0)))


def _identification_score(preds: Sequence[np.ndarray], y_val: np.ndarray, labels: np.ndarray) -> float:
    """``-(categories identified) + MSE`` of the task-alone predictions (``preds[-1]``) on validation (MSE < 1)."""
    from cbvae_ext.evaluation.conditional import identification

    present = [c for c in np.unique(labels) if c >= 0]
    mse = float(np.mean([((p - y_val) ** 2).mean() for p in preds]))
    if not present:
        return mse
    task_maps = np.stack([preds[-1][labels == c].mean(0) for c in present])
    heldout = np.stack([y_val[labels == c].mean(0) for c in present])
    return -identification(task_maps, heldout, [str(c) for c in present])["n_correct"] + mse
