"""Export a trained network for the demo: TorchScript decoder, its schema, and the latent table.

``export_decoder`` writes ``RUN/decoder.ts`` (``forward(z [B, L], m [B, meta_dim + mask_dim]) -> maps
[B, 1, D, H, W]`` in [0, 1]), ``RUN/conditional_mean.ts`` (``forward(m) -> maps``: the model's estimate
of the mean map given the conditions alone; only for a network with a conditional-mean path),
``RUN/decoder_schema.json`` (with the ``imputed_defaults`` the decoder gets for a missing field), a copy
of the mask and, for a schema with a terms group, ``RUN/term_embedding.npz`` (the training split's text
embedding, so typed words become the ``terms`` condition without the dataset); ``write_latents`` writes ``RUN/latents.parquet`` with every study's posterior mean.
``cbvae_ext.run_folder.RunFolder`` reads them back.
"""

from __future__ import annotations

import copy
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from cbvae_ext.data import normalise_maps
from cbvae_ext.errors import CbvaeError
from cbvae_ext.networks import MODELS, ConditionalBetaVAE, unwrap
from cbvae_ext.run_folder import (
    COND_MEAN,
    DECODER,
    LATENTS,
    MASK,
    SCHEMA,
    TERM_EMBEDDING,
    remove_stale_temporaries,
    replace_atomically,
    write_json_atomically,
)
from cbvae_ext.schema import MetadataSchema

__all__ = [
    "ConditionalMeanModule",
    "DecoderModule",
    "ExportError",
    "export_decoder",
    "has_conditional_mean_path",
    "imputed_defaults",
    "latent_kl",
    "trace_conditional_mean",
    "trace_decoder",
    "write_latents",
]


class ExportError(CbvaeError, ValueError):
    """A model that does not fit the grid or schema it is exported with."""


class DecoderModule(nn.Module):
    """``forward(z, m) -> sigmoid(model.decode(z, m))``: the map in [0, 1] (the baseline ignores ``m``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model.decode(z, m))


class ConditionalMeanModule(nn.Module):
    """``forward(m) -> sigmoid(model.conditional_mean(m))``: the conditional mean map in [0, 1], no latent."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model.conditional_mean(m))


def trace_conditional_mean(model: nn.Module, cond_dim: int) -> torch.jit.ScriptModule:
    """Trace and freeze ``ConditionalMeanModule(model)`` on CPU in eval mode (as ``trace_decoder``)."""
    wrapper = ConditionalMeanModule(copy.deepcopy(model).float().cpu().eval()).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.freeze(torch.jit.trace(wrapper, (torch.zeros(1, cond_dim),)))


def _model_name(model: nn.Module) -> str:
    for name, cls in MODELS.items():
        if isinstance(model, cls):
            return name
    raise ExportError(
        f"cannot export {type(model).__name__}; expected one of {', '.join(c.__name__ for c in MODELS.values())}"
    )


def trace_decoder(model: nn.Module, cond_dim: int) -> torch.jit.ScriptModule:
    """Trace ``DecoderModule(model)`` on CPU in eval mode and freeze it (batch-norm folded, weights inlined).

    The model is deep-copied, so a model still in training is left as it is.
    """
    wrapper = DecoderModule(copy.deepcopy(model).float().cpu().eval()).eval()
    example = (torch.zeros(1, model.latent_size), torch.zeros(1, cond_dim))
    with torch.no_grad(), warnings.catch_warnings():
        # torch.jit is deprecated but still the only format that loads without this package; the tracer's
        # "converting a tensor to a Python value" warnings come from shape checks on fixed channel counts
        warnings.simplefilter("ignore")
        return torch.jit.freeze(torch.jit.trace(wrapper, example))


def has_conditional_mean_path(model: nn.Module) -> bool:
    """Whether ``model.conditional_mean`` is a fitted conditional-mean path (not ``decode(0, m)``)."""
    model = unwrap(model)
    return isinstance(model, ConditionalBetaVAE) and model.cond_mean is not None


def imputed_defaults(
    model: nn.Module, dataset_info: Any, split: str = "train", max_maps: int = 2048, batch_size: int = 32
) -> dict[str, float]:
    """The value the decoder gets for a missing continuous field when there is no map to impute it from.

    In training, a missing field enters the decoder as the imputation head's prediction from the map
    (``complete_metadata``); without a map, the stand-in is the mean of those predictions over the
    ``split`` maps (normalised units; at most ``max_maps`` of them, evenly spaced, so a large dataset is not
    read a second time after ``write_latents``). A network without an imputation head (the baseline, whose
    decoder ignores the conditions) gets 0, the training mean.

    Args:
        model: trained network (its mode is restored after).
        dataset_info: ``cbvae_ext.data.DatasetInfo`` of the training dataset.
        split: the rows averaged over.
        max_maps: at most this many of them (the standard error of the mean is then ~sd / 45).
        batch_size: maps per forward pass.

    Returns:
        field name -> normalised value, for every field of the dataset's schema.
    """
    model = unwrap(model)
    names = [f.name for f in dataset_info.schema.fields]
    rows = dataset_info.rows(split)
    if len(rows) > max_maps:
        rows = rows[np.linspace(0, len(rows) - 1, max_maps).round().astype(int)]
    if not hasattr(model, "impute") or not len(rows):
        return dict.fromkeys(names, 0.0)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros(len(names), dtype=torch.float64)
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch = rows[start : start + batch_size]
                x = normalise_maps(dataset_info.maps[batch]).unsqueeze(1).to(device)
                total += model.impute(x)[0].double().sum(dim=0).cpu()
    finally:
        model.train(was_training)
    mean = (total / len(rows)).tolist()
    if not all(np.isfinite(mean)):
        raise ExportError(f"the imputation head gives NaN/infinite values on the {split} maps; the run diverged")
    return dict(zip(names, mean, strict=True))


def export_decoder(
    model: nn.Module,
    schema: MetadataSchema,
    grid_shape: Sequence[int],
    affine: np.ndarray,
    mask_path: str | Path,
    run_dir: str | Path,
    latent_kl: Sequence[float] | np.ndarray | None = None,
    dataset_dir: str | Path | None = None,
    imputed: Mapping[str, float] | None = None,
) -> Path:
    """Write ``decoder.ts``, ``conditional_mean.ts``, ``decoder_schema.json`` and ``mask.nii.gz`` into ``run_dir``.

    Args:
        model: a ``ConditionalBetaVAE`` or ``BaselineVAE`` (any device, any mode).
        schema: the dataset's metadata schema.
        grid_shape: map grid ``(D, H, W)``; must be the decoder's output grid.
        affine: 4x4 voxel-to-MNI affine of the grid.
        mask_path: the dataset's ``mask.nii.gz``.
        run_dir: run folder.
        latent_kl: mean KL per latent dimension on the training split (``write_latents`` returns it).
        dataset_dir: the training dataset folder, recorded so the app can show a study's real map.
        imputed: ``imputed_defaults`` of the model (normalised, by field name); when None they are
            computed from the training maps of ``dataset_dir``, or 0 (the training mean) without one.

    Returns:
        Path of ``decoder.ts``.

    Raises:
        ExportError: the grid or the schema does not match the model.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model = unwrap(model)
    name = _model_name(model)
    grid = [int(s) for s in grid_shape]
    if list(model.decoder.out_shape) != grid:
        raise ExportError(f"grid_shape {grid} differs from the decoder's output grid {list(model.decoder.out_shape)}")
    film = model.decoder.film
    cond_dim = schema.meta_dim + schema.mask_dim
    if film is not None and film.mlp[0].in_features != cond_dim:
        raise ExportError(
            f"schema gives a conditioning vector of {cond_dim} values but the decoder takes "
            f"{film.mlp[0].in_features}; export with the schema of the dataset the model was trained on"
        )
    if imputed is None and dataset_dir is not None:
        from cbvae_ext.data import load_dataset_info

        imputed = imputed_defaults(model, load_dataset_info(dataset_dir))
    defaults = {f.name: 0.0 for f in schema.fields} if imputed is None else {k: float(v) for k, v in imputed.items()}
    if sorted(defaults) != sorted(f.name for f in schema.fields) or not all(map(np.isfinite, defaults.values())):
        raise ExportError(f"imputed defaults {defaults} do not give a finite value for every field of the schema")
    decoder = trace_decoder(model, cond_dim)
    path = replace_atomically(run_dir / DECODER, lambda tmp: torch.jit.save(decoder, tmp))
    with_path = has_conditional_mean_path(model)
    if with_path:
        cond_mean = trace_conditional_mean(model, cond_dim)
        replace_atomically(run_dir / COND_MEAN, lambda tmp: torch.jit.save(cond_mean, tmp))
    else:
        # a file left by an earlier export into this folder would claim a path this network lacks
        (run_dir / COND_MEAN).unlink(missing_ok=True)
        remove_stale_temporaries(run_dir / COND_MEAN)
    with_terms = bool(schema.term_dims)
    if with_terms and dataset_dir is None:
        raise ExportError("the schema has a terms group: pass dataset_dir, whose terms.npz holds the text embedding")
    if with_terms:
        from cbvae_ext.data.neuroquery import load_terms

        terms = load_terms(dataset_dir)
        if terms is None or terms.embedding is None or terms.embedding.dims != schema.term_dims:
            raise ExportError(f"{dataset_dir} has no {schema.term_dims}-entry text embedding in terms.npz; rebuild it")
        replace_atomically(run_dir / TERM_EMBEDDING, terms.embedder().save)
    else:
        (run_dir / TERM_EMBEDDING).unlink(missing_ok=True)
        remove_stale_temporaries(run_dir / TERM_EMBEDDING)
    meta = schema.to_dict()
    info: dict[str, Any] = {
        "latent_size": int(model.latent_size),
        "model": name,
        "meta_schema": meta,
        "decoder_input_layout": meta["meta_layout"] + meta["mask_layout"],
        "grid": {"shape": grid, "affine": np.asarray(affine, dtype=float).tolist()},
        "mask_file": MASK,
        "conditional_mean_file": COND_MEAN if with_path else None,
        "term_embedding_file": TERM_EMBEDDING if with_terms else None,
        "latent_kl": None if latent_kl is None else [float(v) for v in latent_kl],
        # a missing field enters the decoder with mask 0 and this value (see ``imputed_defaults``)
        "imputed_defaults": defaults,
        "dataset_dir": None if dataset_dir is None else str(Path(dataset_dir).resolve()),
    }
    write_json_atomically(run_dir / SCHEMA, info)
    target = run_dir / MASK
    if Path(mask_path).resolve() != target.resolve():
        replace_atomically(target, lambda tmp: shutil.copyfile(mask_path, tmp))
    return path


def latent_kl(mu: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """Mean over rows of ``KL(N(mu, sigma^2) || N(0, 1))`` per latent dimension."""
    return (0.5 * (mu**2 + np.exp(logvar) - 1.0 - logvar)).mean(axis=0)


def write_latents(
    model: nn.Module, dataset_info: Any, run_dir: str | Path, device: str | torch.device = "cpu", batch_size: int = 32
) -> np.ndarray:
    """Write ``latents.parquet`` (``id, title, year, category, split, mu``) for every study.

    Args:
        model: trained network; evaluated in eval mode without gradients, its mode restored after.
        dataset_info: ``cbvae_ext.data.DatasetInfo`` (``maps``, ``metadata``, ``encode(rows)``).
        run_dir: run folder.
        device: device the model is on.
        batch_size: maps per forward pass.

    Returns:
        Mean KL per latent dimension over the training rows (``latent_kl`` of ``export_decoder``).
    """
    model = unwrap(model)
    frame = dataset_info.metadata
    meta, meta_mask = dataset_info.encode(np.arange(len(frame)))
    was_training = model.training
    model.eval()
    mus, logvars = [], []
    try:
        with torch.no_grad():
            for start in range(0, len(frame), batch_size):
                stop = min(start + batch_size, len(frame))
                x = normalise_maps(dataset_info.maps[start:stop]).unsqueeze(1).to(device)
                mu, logvar = model.encode(
                    x, torch.from_numpy(meta[start:stop]).to(device), torch.from_numpy(meta_mask[start:stop]).to(device)
                )
                mus.append(mu.float().cpu().numpy())
                logvars.append(logvar.float().cpu().numpy())
    finally:
        model.train(was_training)
    mu = np.concatenate(mus) if mus else np.zeros((0, model.latent_size), np.float32)
    logvar = np.concatenate(logvars) if logvars else mu.copy()
    table = pd.DataFrame(
        {
            "id": frame["id"].astype(str).to_numpy(),
            "title": frame["title"].to_numpy() if "title" in frame else None,
            "year": frame["year"].to_numpy(np.float64),
            "category": frame["category"].to_numpy(),
            "split": frame["split"].astype(str).to_numpy(),
            "mu": [row.tolist() for row in mu],
        }
    )
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    replace_atomically(run_dir / LATENTS, lambda tmp: table.to_parquet(tmp, index=False))
    train = frame["split"].to_numpy() == "train"
    return latent_kl(mu[train], logvar[train]) if train.any() else np.zeros(model.latent_size)
