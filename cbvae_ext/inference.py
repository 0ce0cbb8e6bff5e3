"""Counterfactual decoding from a run folder: ``load(RUN).decode(z, {"task": ..., "year": ...})``.

``load`` needs ``decoder.ts``, ``decoder_schema.json`` and ``mask.nii.gz``; ``encode`` also needs
``network_config.json`` and ``model.pt`` (read on first use). Conditions are named raw values
(``{"task": "working memory", "year": 2005, "sample_size": 20}``) validated by the run's
``MetadataSchema``. A condition left out is filled like a missing value in training: with the value the
imputation head predicted for a real map when ``imputed`` is given (see ``encode``), else with the schema
default (normalised 0, the training mean); its mask entry is 0 either way, and the result reports it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from cbvae_ext.export import (
    COND_MEAN_FILE,
    CONFIG_FILE,
    DECODER_FILE,
    MASK_FILE,
    MODEL_FILE,
    SCHEMA_FILE,
    normalise_maps,
)
from cbvae_ext.networks import build_network
from cbvae_ext.schema import MetadataSchema

__all__ = ["TRAIN_COMMAND", "CounterfactualModel", "DecodeResult", "RunFolderError", "load"]

#: How a run folder is made (named in the errors for missing files).
TRAIN_COMMAND = (
    "python -m monai.bundle run training --config_file bundle/configs/train.yaml --dataset_dir DATA --output_dir RUN"
)


class RunFolderError(ValueError):
    """A run folder is missing a file or its files do not match each other."""


@dataclass
class DecodeResult:
    """One decoded map.

    Attributes:
        map: float32 ``[D, H, W]`` in [0, 1], 0 outside the brain mask.
        affine: 4x4 voxel-to-MNI affine.
        conditions: the conditions as given.
        imputed: fields filled from ``imputed`` values (raw units).
        defaulted: fields filled with the schema default (raw units; ``"task": None`` = no category).
    """

    map: np.ndarray
    affine: np.ndarray
    conditions: dict[str, Any]
    imputed: dict[str, float] = field(default_factory=dict)
    defaulted: dict[str, float | None] = field(default_factory=dict)

    def to_nifti(self) -> nib.Nifti1Image:
        """The map as a NIfTI image in MNI space (plot it with ``nilearn.plotting``)."""
        return nib.Nifti1Image(self.map.astype(np.float32), self.affine)


class CounterfactualModel:
    """A run's TorchScript decoder (and, on demand, its encoder) behind named conditions.

    Args:
        run_dir: the run folder.
        decoder: the loaded ``decoder.ts``.
        info: the content of ``decoder_schema.json``.
        mask: bool brain mask on the grid.
    """

    def __init__(self, run_dir: Path, decoder: torch.jit.ScriptModule, info: dict[str, Any], mask: np.ndarray) -> None:
        self.run_dir = run_dir
        self.decoder = decoder
        self.info = info
        self.mask = mask
        self.schema = MetadataSchema.from_dict(info["meta_schema"])
        self.latent_size = int(info["latent_size"])
        self.affine = np.asarray(info["grid"]["affine"], dtype=np.float64)
        self.grid_shape = tuple(int(s) for s in info["grid"]["shape"])
        self.latent_kl = info.get("latent_kl")
        self._network: torch.nn.Module | None = None
        self._cond_mean: torch.jit.ScriptModule | None = None
        self._cond_mean_read = False

    @property
    def categories(self) -> list[str]:
        return list(self.schema.categories)

    # ----- conditions -----------------------------------------------------------------------
    def conditioning(
        self,
        conditions: Mapping[str, Any] | None,
        allow_extrapolation: bool = False,
        imputed: Mapping[str, float] | None = None,
    ) -> tuple[np.ndarray, dict[str, float], dict[str, float | None]]:
        """Decoder input ``m [meta_dim + mask_dim]`` for named conditions, with what was imputed/defaulted.

        Raises:
            SchemaError: unknown condition or task, a value out of range (unless ``allow_extrapolation``),
                a negative count.
        """
        conditions = {k: v for k, v in (conditions or {}).items() if v is not None}
        meta, mask = self.schema.encode_conditions(conditions, allow_extrapolation)
        filled: dict[str, float] = {}
        defaulted: dict[str, float | None] = {}
        for j, spec in enumerate(self.schema.fields):
            if spec.name in conditions:
                continue
            value = (imputed or {}).get(spec.name)
            if value is not None and math.isfinite(float(value)):
                meta[j] = float(spec.forward(float(value)))
                filled[spec.name] = float(value)
            else:
                meta[j] = float(self.info.get("imputed_defaults", {}).get(spec.name, 0.0))
                defaulted[spec.name] = float(spec.inverse(meta[j]))
        if "task" not in conditions:
            defaulted["task"] = None
        return np.concatenate([meta, mask]).astype(np.float32), filled, defaulted

    def _latents(self, z: np.ndarray | Sequence[float] | torch.Tensor, n: int) -> torch.Tensor:
        """``z`` as float32 ``[n, L]``: one latent vector is repeated, else one row per condition set."""
        z = torch.as_tensor(np.asarray(z, dtype=np.float32) if not torch.is_tensor(z) else z).float()
        if z.numel() % self.latent_size:
            raise ValueError(f"z has {z.numel()} values; the run's latent size is {self.latent_size}")
        z = z.reshape(-1, self.latent_size)
        if len(z) == 1:
            return z.expand(n, -1)
        if len(z) != n:
            raise ValueError(f"z has {len(z)} rows for {n} condition sets; pass one z or one per condition set")
        return z

    # ----- decoding -------------------------------------------------------------------------
    def decode(
        self,
        z: np.ndarray | Sequence[float] | torch.Tensor,
        conditions: Mapping[str, Any] | None = None,
        allow_extrapolation: bool = False,
        imputed: Mapping[str, float] | None = None,
    ) -> DecodeResult:
        """Decode one latent vector ``z [L]`` under named conditions.

        Args:
            z: latent vector (e.g. a study's ``mu`` from ``latents.parquet`` or ``encode``).
            conditions: ``{"task": ..., "year": ..., "sample_size": ..., "field_strength": ..., "fwhm": ...}``.
            allow_extrapolation: accept values outside the training range.
            imputed: raw values for the fields left out (``encode(..., return_imputed=True)``).
        """
        return self.decode_many(z, [conditions or {}], allow_extrapolation, imputed)[0]

    def decode_many(
        self,
        z: np.ndarray | Sequence[float] | torch.Tensor,
        conditions: Sequence[Mapping[str, Any]],
        allow_extrapolation: bool = False,
        imputed: Mapping[str, float] | None = None,
    ) -> list[DecodeResult]:
        """Decode in one batch, e.g. a year sweep: one ``z`` (or one per condition set) under each condition set."""
        rows = [self.conditioning(c, allow_extrapolation, imputed) for c in conditions]
        m = torch.from_numpy(np.stack([r[0] for r in rows])) if rows else torch.zeros(0)
        latents = self._latents(z, len(rows))
        with torch.no_grad():
            maps = self.decoder(latents, m)[:, 0].numpy() if rows else np.zeros((0, *self.grid_shape), np.float32)
        maps = np.where(self.mask, maps, 0.0).astype(np.float32)
        return [
            DecodeResult(maps[i], self.affine, dict(c), filled, defaulted)
            for i, (c, (_, filled, defaulted)) in enumerate(zip(conditions, rows, strict=True))
        ]

    # ----- conditions alone -------------------------------------------------------------------
    def conditional_mean(
        self, conditions: Mapping[str, Any] | None = None, allow_extrapolation: bool = False
    ) -> DecodeResult:
        """The model's estimate of the mean map of studies with these conditions (no latent code).

        Read from ``conditional_mean.ts`` (the conditional-mean path); a run exported without it uses
        ``decode(0, conditions)``. Conditions left out are unknown, as in ``decode``.
        """
        if not self._cond_mean_read:
            path = self.run_dir / self.info.get("conditional_mean_file", COND_MEAN_FILE)
            self._cond_mean = torch.jit.load(str(path), map_location="cpu").eval() if path.is_file() else None
            self._cond_mean_read = True
        if self._cond_mean is None:
            return self.decode(np.zeros(self.latent_size, np.float32), conditions, allow_extrapolation)
        m, filled, defaulted = self.conditioning(conditions, allow_extrapolation)
        with torch.no_grad():
            out = self._cond_mean(torch.from_numpy(m[None]))[0, 0].numpy()
        return DecodeResult(
            np.where(self.mask, out, 0.0).astype(np.float32), self.affine, dict(conditions or {}), filled, defaulted
        )

    def contrast(
        self,
        z: np.ndarray | Sequence[float] | torch.Tensor,
        conditions: Mapping[str, Any],
        hidden: Sequence[str] = ("task",),
        strength: float = 1.0,
        allow_extrapolation: bool = False,
    ) -> np.ndarray:
        """``strength * (decode(z, conditions) - decode(z, conditions without hidden))``, ``[D, H, W]``.

        With the conditions in ``hidden`` unknown (mask 0, the learned "unknown" token) the difference is
        what those conditions add to the map of ``z``, e.g. a task contrast the app can scale.
        """
        without = {k: v for k, v in conditions.items() if k not in hidden}
        given, base = self.decode_many(z, [dict(conditions), without], allow_extrapolation)
        return (float(strength) * (given.map - base.map)).astype(np.float32)

    # ----- encoding -------------------------------------------------------------------------
    def network(self) -> torch.nn.Module:
        """The full network from ``network_config.json`` + ``model.pt`` (loaded once, eval mode, CPU)."""
        if self._network is None:
            self._network = _load_network(self.run_dir, self.info)
        return self._network

    def encode(
        self,
        image: np.ndarray,
        conditions: Mapping[str, Any] | None = None,
        allow_extrapolation: bool = False,
        return_imputed: bool = False,
    ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """Posterior ``(mu [L], logvar [L])`` of a map ``[D, H, W]`` (raw MA values or scaled to [0, 1]).

        Args:
            image: map on the run's grid.
            conditions: the map's known metadata (left-out fields enter as missing).
            allow_extrapolation: accept values outside the training range.
            return_imputed: also return the imputation head's prediction of every continuous field (raw
                units; empty for the baseline), to pass as ``decode(..., imputed=...)``.

        Raises:
            ValueError: the map's shape differs from the grid, or it is not finite or all zero.
        """
        image = np.asarray(image, dtype=np.float32)
        if image.shape != self.grid_shape:
            raise ValueError(
                f"map shape {image.shape} differs from the run's grid {self.grid_shape}; resample it first"
            )
        if not np.isfinite(image).all() or image.max() <= 0:
            raise ValueError("map must be finite with a positive maximum (a modeled-activation map)")
        conditions = {k: v for k, v in (conditions or {}).items() if v is not None}
        meta, mask = self.schema.encode_conditions(conditions, allow_extrapolation)
        net = self.network()
        x = normalise_maps(image[None])
        with torch.no_grad():
            mu, logvar = net.encode(x, torch.from_numpy(meta[None]), torch.from_numpy(mask[None]))
            imp = net.impute(x)[0][0].numpy() if hasattr(net, "impute") else None
        out = (mu[0].numpy(), logvar[0].numpy())
        if not return_imputed:
            return out
        imputed = {} if imp is None else {s.name: float(s.inverse(imp[j])) for j, s in enumerate(self.schema.fields)}
        return (*out, imputed)


def _require(run_dir: Path, name: str) -> Path:
    path = run_dir / name
    if not path.is_file():
        raise RunFolderError(f"run folder {run_dir} has no {name}; train and export a run with: {TRAIN_COMMAND}")
    return path


def _load_network(run_dir: Path, info: Mapping[str, Any]) -> torch.nn.Module:
    config = json.loads(_require(run_dir, CONFIG_FILE).read_text())
    state = torch.load(_require(run_dir, MODEL_FILE), map_location="cpu", weights_only=True)
    if int(config.get("latent_size", -1)) != int(info["latent_size"]) or config.get("model") != info.get("model"):
        raise RunFolderError(
            f"{run_dir / CONFIG_FILE} ({config.get('model')}, latent {config.get('latent_size')}) does not match "
            f"{run_dir / SCHEMA_FILE} ({info.get('model')}, latent {info['latent_size']}); re-export the run"
        )
    try:
        net = build_network(config)
        net.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0]
        raise RunFolderError(f"{run_dir / MODEL_FILE} does not fit {run_dir / CONFIG_FILE}: {first}") from None
    return net.eval()


def load(run_dir: str | Path) -> CounterfactualModel:
    """Open a run folder for decoding (and encoding).

    Raises:
        RunFolderError: a required file is missing or unreadable.
    """
    run_dir = Path(run_dir)
    decoder_path = _require(run_dir, DECODER_FILE)
    try:
        info = json.loads(_require(run_dir, SCHEMA_FILE).read_text())
        info["latent_size"], info["grid"]["shape"], info["meta_schema"]  # noqa: B018 - presence check
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise RunFolderError(f"{run_dir / SCHEMA_FILE} is malformed ({err}); re-export the run") from None
    mask_img = nib.load(_require(run_dir, info.get("mask_file", MASK_FILE)))
    mask = np.asarray(mask_img.dataobj) > 0
    if mask.shape != tuple(info["grid"]["shape"]):
        raise RunFolderError(f"{run_dir / MASK_FILE} has shape {mask.shape}, not the grid {info['grid']['shape']}")
    try:
        decoder = torch.jit.load(str(decoder_path), map_location="cpu").eval()
    except RuntimeError as err:
        raise RunFolderError(
            f"{decoder_path} is not a TorchScript file ({str(err).splitlines()[0]}); re-export the run"
        ) from None
    return CounterfactualModel(run_dir, decoder, info, mask)
