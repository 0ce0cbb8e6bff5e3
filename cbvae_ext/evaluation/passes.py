"""Passes over a split: maps and conditions in memory, and every per-map quantity a network gives.

Maps are held as ``[N, V]`` in-mask vectors in loader units (each map over its own maximum); batches
are rebuilt into volumes for the network. Everything here is per map, so the per-map table can be
written and every criterion recomputed from it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from cbvae_ext.data.builder import vector_columns
from cbvae_ext.evaluation.columns import COND, LOGLIK_ELBO, LOGLIK_IWAE, RECON, hidden
from cbvae_ext.evaluation.conditional import conditional_mean_probs
from cbvae_ext.evaluation.likelihood import bernoulli_nll, importance_weighted_bound
from cbvae_ext.evaluation.metrics import masked_vectors, peak_auc, score_maps, to_volumes
from cbvae_ext.networks.conditioning import hide_groups
from cbvae_ext.schema import ConditionGroup

__all__ = ["PassOptions", "SplitData", "encode_split", "imputed_raw", "load_split", "peak_indicator", "score_network"]


@dataclass
class SplitData:
    """One split (or any rows) of a dataset, encoded with the evaluation schema.

    Attributes:
        ids: study ids.
        maps: ``[N, V]`` float32 in-mask maps in [0, 1].
        meta: ``[N, meta_dim]`` conditions as the model sees them.
        meta_mask: ``[N, mask_dim]`` observed flags.
        categories: task category index per row (-1 = missing).
        year_bin: year bin per row (-1 = missing).
        frame: the rows of ``metadata.parquet``.
    """

    ids: list[str]
    maps: np.ndarray
    meta: np.ndarray
    meta_mask: np.ndarray
    categories: np.ndarray
    year_bin: np.ndarray
    frame: pd.DataFrame

    @property
    def n(self) -> int:
        return len(self.ids)


def load_split(info: Any, rows: np.ndarray, schema: Any = None, chunk: int = 256) -> SplitData:
    """Read ``rows`` of a dataset (``DatasetInfo``) into memory, conditions encoded with ``schema``.

    Args:
        info: the dataset (``load_dataset_info``).
        rows: row indices.
        schema: the schema the model was trained with (default: the dataset's own).
        chunk: maps read from the memory map at a time.
    """
    if schema is not None:
        info = replace(info, schema=schema)
    for name, size in info.schema.vector_sizes.items():
        absent = [c for c in vector_columns(name, size) if c not in info.metadata.columns]
        if (
            absent
        ):  # a NeuroStore-only dataset has no topic weights or text: missing (mask 0) for a model that takes them
            info = replace(
                info, metadata=info.metadata.assign(**dict.fromkeys(absent, np.nan), **{f"{name}_observed": False})
            )
    mask = np.asarray(info.mask, dtype=bool)
    maps = np.empty((len(rows), int(mask.sum())), dtype=np.float32)
    for start in range(0, len(rows), chunk):
        block = np.asarray(info.maps[rows[start : start + chunk]], dtype=np.float32)[:, mask]
        maps[start : start + len(block)] = block / np.maximum(
            block.max(axis=1, keepdims=True), np.finfo(np.float32).tiny
        )
    meta, meta_mask = info.encode(rows)
    frame = info.metadata.iloc[rows].reset_index(drop=True)
    return SplitData(
        ids=[str(i) for i in frame["id"]],
        maps=maps,
        meta=np.asarray(meta, dtype=np.float32),
        meta_mask=np.asarray(meta_mask, dtype=np.float32),
        categories=info.category_index(rows),
        year_bin=frame["year_bin"].to_numpy(np.int64),
        frame=frame,
    )


def peak_indicator(info: Any, maps: np.ndarray) -> tuple[np.ndarray | None, str]:
    """Bool ``[N, V]`` marking each study's reported peak voxels, and how they were found.

    The dataset stores MA maps, not the peak table; for the ALE kernel (one fixed Gaussian, combined by
    voxel-wise maximum) every peak voxel carries the kernel's maximum, which is the map's maximum, and no
    other voxel does -- so the peaks are exactly the voxels equal to 1 in loader units. An MKDA sphere
    is flat, so its peaks cannot be recovered: None.
    """
    kernel = (info.manifest.get("kernel") or {}).get("name")
    if kernel != "ale":
        return None, f"the dataset's {kernel!r} kernel is flat around a peak; peaks cannot be read from its maps"
    return maps >= 1.0, "voxels at the map's maximum (exact for the fixed-width ALE kernel combined by maximum)"


@dataclass
class PassOptions:
    """What a network pass computes.

    Attributes:
        iwae_k: importance samples of the likelihood bound (0 = no bound).
        iwae_rows: rows (from the first) that get the bound; None = all.
        conditional: also score the conditional-only map (conditional networks).
        hidden: condition groups hidden in turn (then all of them) for reconstruction; empty = skip.
        ssim: also the masked SSIM of the reconstruction.
        n_prior_samples: prior decodes averaged when the network has no conditional-mean path.
        imputed_defaults: normalised value the run's decoder uses for each missing continuous field.
    """

    iwae_k: int = 0
    iwae_rows: int | None = None
    conditional: bool = False
    hidden: tuple[ConditionGroup, ...] = ()
    ssim: bool = False
    n_prior_samples: int = 32
    imputed_defaults: torch.Tensor | None = None


def _volumes(maps: np.ndarray, mask: np.ndarray, device: str | torch.device) -> torch.Tensor:
    return torch.from_numpy(to_volumes(maps, mask))[:, None].to(device).contiguous(memory_format=torch.channels_last_3d)


def _batches(n: int, batch_size: int) -> list[slice]:
    return [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


@torch.no_grad()
def encode_split(
    model: torch.nn.Module, data: SplitData, mask: np.ndarray, batch_size: int, device: str | torch.device
) -> np.ndarray:
    """Posterior means ``μ [N, L]`` of every map of ``data``."""
    mus = []
    for sl in _batches(data.n, batch_size):
        meta, meta_mask = (torch.from_numpy(a[sl]).to(device) for a in (data.meta, data.meta_mask))
        mu, _ = model.encode(_volumes(data.maps[sl], mask, device), meta, meta_mask)
        mus.append(mu.float().cpu().numpy())
    return np.concatenate(mus) if mus else np.zeros((0, 1), np.float32)


@torch.no_grad()
def score_network(
    model: torch.nn.Module,
    data: SplitData,
    mask: np.ndarray,
    peaks: np.ndarray | None,
    options: PassOptions,
    batch_size: int,
    device: str | torch.device,
    generator: torch.Generator,
    n_examples: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Every per-map quantity of one network on ``data``.

    Returns:
        ``columns``: per-map arrays keyed ``recon/<metric>``, ``cond/<metric>``, ``hidden_<group>/<metric>``,
        ``loglik_iwae``, ``loglik_elbo``, ``log_px_z`` (NaN beyond ``iwae_rows``); ``mu``, ``imp_mu`` (raw units per
        continuous field, or None), ``year_logits`` (or None), ``cond_source``, ``cond_maps`` (the conditional-only maps ``[N, V]``, or None) and ``examples`` (the first
        ``n_examples`` reconstructions as ``[n, V]``) and ``seconds`` (total, and spent on the bound, the
        conditional maps and the hidden-condition passes).
    """
    inside = torch.as_tensor(np.flatnonzero(np.asarray(mask).ravel()), device=device)
    cols: dict[str, list[np.ndarray]] = {}
    mus, imps, years, examples, cond_maps = [], [], [], [], []
    cond_source = None
    seconds = dict.fromkeys(("total", "iwae", "conditional", "hidden"), 0.0)
    started = time.perf_counter()
    limit = data.n if options.iwae_rows is None else min(options.iwae_rows, data.n)

    def add(key: str, value: np.ndarray) -> None:
        cols.setdefault(key, []).append(np.asarray(value, dtype=np.float64))

    def add_scores(prefix: str, pred: np.ndarray, target: np.ndarray, peaks_b: np.ndarray | None, ssim: bool) -> None:
        for k, v in score_maps(pred, target, mask, ssim=ssim).items():
            add(f"{prefix}/{k}", v)
        if peaks_b is not None:
            add(f"{prefix}/peak_auc", peak_auc(pred, peaks_b))

    for sl in _batches(data.n, batch_size):
        target = data.maps[sl]
        x = _volumes(target, mask, device)
        meta, meta_mask = (torch.from_numpy(a[sl]).to(device) for a in (data.meta, data.meta_mask))
        peaks_b = None if peaks is None else peaks[sl]
        out = model(x, meta, meta_mask)  # eval mode: z = μ, the point reconstruction
        pred = masked_vectors(torch.sigmoid(out["recon"].float()).cpu().numpy(), mask)
        add_scores(RECON, pred, target, None, options.ssim)
        if len(examples) * batch_size < n_examples:
            examples.append(pred[: n_examples - sum(len(e) for e in examples)])
        mus.append(out["mu"].float().cpu().numpy())
        if out.get("imp_mu") is not None:
            imps.append(out["imp_mu"].float().cpu().numpy())
        if out.get("year_logits") is not None:
            years.append(out["year_logits"].float().cpu().numpy())
        # the decoder's conditions without the map's own imputation: missing fields at the run's default
        imp0 = options.imputed_defaults
        imp0 = None if imp0 is None else imp0.to(device).expand(len(x), -1)
        m0 = model.decoder_input(meta, meta_mask, imp0)
        tic = time.perf_counter()
        if options.iwae_k:
            n_in = max(0, min(sl.stop, limit) - sl.start)
            bound = {k: np.full(len(x), np.nan) for k in ("iwae", "elbo", "log_px_z")}
            if n_in:
                xi, mi = torch.from_numpy(target[:n_in]).to(device), m0[:n_in]
                res = importance_weighted_bound(
                    lambda z, xi=xi, mi=mi: -bernoulli_nll(model.decode(z, mi).flatten(1)[:, inside], xi),
                    out["mu"][:n_in],
                    out["logvar"][:n_in],
                    options.iwae_k,
                    generator,
                )
                for k in bound:
                    bound[k][:n_in] = res[k].cpu().numpy()
            add(LOGLIK_IWAE, bound["iwae"])
            add(LOGLIK_ELBO, bound["elbo"])
            add("log_px_z", bound["log_px_z"])
        seconds["iwae"] += time.perf_counter() - tic
        tic = time.perf_counter()
        if options.conditional:
            probs, cond_source = conditional_mean_probs(model, m0, options.n_prior_samples, generator)
            cond_maps.append(masked_vectors(probs.cpu().numpy(), mask))
            add_scores(COND, cond_maps[-1], target, peaks_b, False)
        seconds["conditional"] += time.perf_counter() - tic
        tic = time.perf_counter()
        if options.hidden:
            variants = [(g.name, [g]) for g in options.hidden] + [("all", list(options.hidden))]
            for name, groups in variants:
                o = model(x, *hide_groups(meta, meta_mask, groups))
                hp = masked_vectors(torch.sigmoid(o["recon"].float()).cpu().numpy(), mask)
                add_scores(hidden(name), hp, target, None, False)
        seconds["hidden"] += time.perf_counter() - tic
        if progress is not None:
            progress(len(x))
    seconds["total"] = time.perf_counter() - started
    return {
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "columns": {k: np.concatenate(v) for k, v in cols.items()},
        "mu": np.concatenate(mus),
        "imp_mu": np.concatenate(imps) if imps else None,
        "year_logits": np.concatenate(years) if years else None,
        "cond_source": cond_source,
        "cond_maps": np.concatenate(cond_maps) if cond_maps else None,
        "examples": np.concatenate(examples) if examples else np.zeros((0, data.maps.shape[1]), np.float32),
    }


def imputed_raw(imp_mu: np.ndarray, schema: Any) -> dict[str, np.ndarray]:
    """Imputation head output (normalised units) as raw values per continuous field."""
    return {spec.name: spec.inverse(imp_mu[:, j]) for j, spec in enumerate(schema.fields) if j < imp_mu.shape[1]}
