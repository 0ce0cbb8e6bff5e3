"""Export a trained network for the demo: TorchScript decoder, its schema, and the latent table.

``export_decoder`` writes ``RUN/decoder.ts`` (``forward(z [B, L], m [B, meta_dim + mask_dim]) -> maps
[B, 1, D, H, W]`` in [0, 1]), ``RUN/conditional_mean.ts`` (``forward(m) -> maps``: the model's estimate
of the mean map given the conditions alone), ``RUN/decoder_schema.json`` and a copy of the mask; ``write_latents`` writes
``RUN/latents.parquet`` with every study's posterior mean. ``cbvae_ext.inference`` reads them back.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from cbvae_ext.networks import MODELS, unwrap
from cbvae_ext.schema import MetadataSchema

__all__ = [
    "COND_MEAN_FILE",
    "CONFIG_FILE",
    "DECODER_FILE",
    "LATENTS_FILE",
    "MASK_FILE",
    "MODEL_FILE",
    "SCHEMA_FILE",
    "ConditionalMeanModule",
    "DecoderModule",
    "export_decoder",
    "latent_kl",
    "normalise_maps",
    "trace_conditional_mean",
    "trace_decoder",
    "write_latents",
]

DECODER_FILE = "decoder.ts"
COND_MEAN_FILE = "conditional_mean.ts"
SCHEMA_FILE = "decoder_schema.json"
MASK_FILE = "mask.nii.gz"
LATENTS_FILE = "latents.parquet"
MODEL_FILE = "model.pt"
CONFIG_FILE = "network_config.json"


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


def normalise_maps(maps: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``[B, D, H, W]`` raw or already scaled maps to float32 ``[B, 1, D, H, W]`` divided by each map's peak.

    Matches the dataset's ``image`` (MA map over its maximum), so raw and normalised inputs agree.
    """
    x = torch.as_tensor(np.asarray(maps, dtype=np.float32) if not torch.is_tensor(maps) else maps).float()
    peak = x.flatten(1).amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    return (x / peak.view(-1, *([1] * (x.ndim - 1)))).unsqueeze(1)


def _model_name(model: nn.Module) -> str:
    for name, cls in MODELS.items():
        if isinstance(model, cls):
            return name
    raise TypeError(
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


def export_decoder(
    model: nn.Module,
    schema: MetadataSchema,
    grid_shape: Sequence[int],
    affine: np.ndarray,
    mask_path: str | Path,
    run_dir: str | Path,
    latent_kl: Sequence[float] | np.ndarray | None = None,
    dataset_dir: str | Path | None = None,
) -> Path:
    """Write ``decoder.ts``, ``decoder_schema.json`` and ``mask.nii.gz`` into ``run_dir``.

    Args:
        model: a ``ConditionalBetaVAE`` or ``BaselineVAE`` (any device, any mode).
        schema: the dataset's metadata schema.
        grid_shape: map grid ``(D, H, W)``; must be the decoder's output grid.
        affine: 4x4 voxel-to-MNI affine of the grid.
        mask_path: the dataset's ``mask.nii.gz``.
        run_dir: run folder.
        latent_kl: mean KL per latent dimension on the training split (``write_latents`` returns it).
        dataset_dir: the training dataset folder, recorded so the app can show a study's real map.

    Returns:
        Path of ``decoder.ts``.

    Raises:
        ValueError: the grid or the schema does not match the model.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model = unwrap(model)
    name = _model_name(model)
    grid = [int(s) for s in grid_shape]
    if list(model.decoder.out_shape) != grid:
        raise ValueError(f"grid_shape {grid} differs from the decoder's output grid {list(model.decoder.out_shape)}")
    film = model.decoder.film
    cond_dim = schema.meta_dim + schema.mask_dim
    if film is not None and film.mlp[0].in_features != cond_dim:
        raise ValueError(
            f"schema gives a conditioning vector of {cond_dim} values but the decoder takes "
            f"{film.mlp[0].in_features}; export with the schema of the dataset the model was trained on"
        )
    decoder = trace_decoder(model, cond_dim)
    path = run_dir / DECODER_FILE
    torch.jit.save(decoder, str(path))
    torch.jit.save(trace_conditional_mean(model, cond_dim), str(run_dir / COND_MEAN_FILE))
    meta = schema.to_dict()
    info: dict[str, Any] = {
        "latent_size": int(model.latent_size),
        "model": name,
        "meta_schema": meta,
        "decoder_input_layout": meta["meta_layout"] + meta["mask_layout"],
        "grid": {"shape": grid, "affine": np.asarray(affine, dtype=float).tolist()},
        "mask_file": MASK_FILE,
        "conditional_mean_file": COND_MEAN_FILE,
        "latent_kl": None if latent_kl is None else [float(v) for v in latent_kl],
        # a missing field enters the decoder as normalised 0 (the training mean) with mask 0
        "imputed_defaults": {spec.name: 0.0 for spec in schema.fields},
        "dataset_dir": None if dataset_dir is None else str(Path(dataset_dir).resolve()),
    }
    (run_dir / SCHEMA_FILE).write_text(json.dumps(info, indent=2))
    target = run_dir / MASK_FILE
    if Path(mask_path).resolve() != target.resolve():
        shutil.copyfile(mask_path, target)
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
                x = normalise_maps(dataset_info.maps[start:stop]).to(device)
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
    table.to_parquet(run_dir / LATENTS_FILE, index=False)
    train = frame["split"].to_numpy() == "train"
    return latent_kl(mu[train], logvar[train]) if train.any() else np.zeros(model.latent_size)
