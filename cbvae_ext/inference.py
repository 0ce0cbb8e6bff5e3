"""Counterfactual decoding from a run folder: ``load(RUN).decode(z, {"task": ..., "year": ...})``.

``load`` needs ``decoder.ts``, ``decoder_schema.json`` and ``mask.nii.gz`` (and ``conditional_mean.ts`` where
the run has a conditional-mean path); ``encode`` also needs ``network_config.json`` and ``model.pt`` (read on
first use). The folder is opened and checked by ``cbvae_ext.run_folder.RunFolder``, which also decodes once
with z = 0 at load: every problem with the folder is a ``RunFolderError`` at ``load``, not at the first
decode. Conditions are named raw values
(``{"task": "working memory", "year": 2005, "sample_size": 20}``) validated by the run's
``MetadataSchema``. A condition left out is filled like a missing value in training: with the value the
imputation head predicted for a real map when ``imputed`` is given (see ``encode``), else with the run's
``imputed_defaults`` (the imputation head's mean over the training maps; 0, the training mean, for older
exports); its mask entry is 0 either way, and the result reports it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from cbvae_ext.data import normalise_maps
from cbvae_ext.errors import CbvaeError
from cbvae_ext.run_folder import EVALUATION_FILES, INFERENCE_FILES, TRAIN_COMMAND, RunFolder, RunFolderError

__all__ = [
    "TRAIN_COMMAND",
    "CounterfactualModel",
    "DecodeResult",
    "InferenceError",
    "NoConditionalMeanError",
    "RunFolderError",
    "load",
]


class InferenceError(CbvaeError, ValueError):
    """A latent vector, map or conditions the run's networks cannot turn into a finite result."""


class NoConditionalMeanError(InferenceError, AttributeError):
    """``conditional_mean`` of a run without a conditional-mean path.

    Also an ``AttributeError``, so ``hasattr(model, "conditional_mean")`` is False for such a run; new code
    reads ``model.has_conditional_mean``.
    """


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

    Made by ``load``; everything about the run is read through its ``RunFolder``.

    Args:
        run: the opened run folder.
        decoder: the loaded (and probed) ``decoder.ts``.
        mask: bool brain mask on the grid.
        cond_mean: the loaded ``conditional_mean.ts``, None for a run without a conditional-mean path.
    """

    def __init__(
        self,
        run: RunFolder,
        decoder: torch.jit.ScriptModule,
        mask: np.ndarray,
        cond_mean: torch.jit.ScriptModule | None = None,
    ) -> None:
        self.run = run
        self.run_dir = run.path
        self.decoder = decoder
        self.info = run.decoder_schema or {}
        self.mask = mask
        self.schema = run.schema
        self.latent_size = run.latent_size
        self.affine = run.affine
        self.grid_shape = run.grid_shape
        self.latent_kl = run.latent_kl
        self.imputed_defaults = run.imputed_defaults
        self._network: torch.nn.Module | None = None
        self._cond_mean = cond_mean

    @property
    def categories(self) -> list[str]:
        return list(self.schema.categories)

    @functools.cached_property
    def term_embedder(self) -> Any:
        """The run's ``TextEmbedder`` (NeuroQuery terms -> the ``terms`` condition); None without a terms group.

        Raises:
            RunFolderError: the run has a terms group but its ``term_embedding.npz`` is missing or damaged.
        """
        return self.run.term_embedder()

    def text_terms(self, text: str) -> np.ndarray | None:
        """The ``terms`` condition of a free text (NeuroQuery's terms of it, embedded as the training studies'
        text was); None when the run has no terms group or no term is recognised."""
        if self.term_embedder is None:
            return None
        embedded, found = self.term_embedder.embed_texts([text])
        return embedded[0] if found[0] else None

    @property
    def has_conditional_mean(self) -> bool:
        """Whether ``conditional_mean`` is available (the run has a conditional-mean path)."""
        return self._cond_mean is not None

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
                meta[j] = self.imputed_defaults[spec.name]
                defaulted[spec.name] = float(spec.inverse(meta[j]))
        if "task" not in conditions:
            defaulted["task"] = None
        return np.concatenate([meta, mask]).astype(np.float32), filled, defaulted

    def _latents(self, z: np.ndarray | Sequence[float] | torch.Tensor, n: int) -> torch.Tensor:
        """``z`` as float32 ``[n, L]``: one latent vector is repeated, else one row per condition set."""
        z = torch.as_tensor(np.asarray(z, dtype=np.float32) if not torch.is_tensor(z) else z).float()
        if z.numel() % self.latent_size:
            raise InferenceError(f"z has {z.numel()} values; the run's latent size is {self.latent_size}")
        if not torch.isfinite(z).all():
            raise InferenceError(
                "z holds NaN or infinite values; pass a finite latent vector (e.g. a row of latents.parquet)"
            )
        z = z.reshape(-1, self.latent_size)
        if len(z) == 1:
            return z.expand(n, -1)
        if len(z) != n:
            raise InferenceError(f"z has {len(z)} rows for {n} condition sets; pass one z or one per condition set")
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
        bad = [i for i in range(len(maps)) if not np.isfinite(maps[i][self.mask]).all()]
        if bad:
            # far extrapolated conditions (or an extreme z) overflow the network: say so instead of a NaN map
            raise InferenceError(
                f"decoding gave NaN/infinite values for conditions {dict(conditions[bad[0]])} (|z| max "
                f"{float(latents[bad[0]].abs().max()):.3g}); use conditions nearer the training range and a z "
                f"within a few units of 0"
            )
        maps = np.where(self.mask, maps, 0.0).astype(np.float32)
        return [
            DecodeResult(maps[i], self.affine, dict(c), filled, defaulted)
            for i, (c, (_, filled, defaulted)) in enumerate(zip(conditions, rows, strict=True))
        ]

    # ----- conditions alone -------------------------------------------------------------------
    @property
    def conditional_mean(self) -> Callable[..., DecodeResult]:
        """``conditional_mean(conditions=None, allow_extrapolation=False) -> DecodeResult``: the model's estimate
        of the mean map of studies with these conditions (no latent code), from ``conditional_mean.ts``.

        Conditions left out are unknown, as in ``decode``. Only a run with a conditional-mean path has it
        (``has_conditional_mean``): ``decode(0, conditions)`` would be a typical map, not the mean.

        Raises:
            NoConditionalMeanError: the run has no conditional-mean path.
        """
        if self._cond_mean is None:
            raise NoConditionalMeanError(
                f"run {self.run_dir} ({self.run.model_kind}) has no conditional-mean path; check "
                "model.has_conditional_mean, and use decode(0, conditions) for a typical map instead"
            )
        return self._conditional_mean

    def _conditional_mean(
        self, conditions: Mapping[str, Any] | None = None, allow_extrapolation: bool = False
    ) -> DecodeResult:
        m, filled, defaulted = self.conditioning(conditions, allow_extrapolation)
        with torch.no_grad():
            out = self._cond_mean(torch.from_numpy(m[None]))[0, 0].numpy()
        if not np.isfinite(out[self.mask]).all():
            raise InferenceError(
                f"the conditional mean gave NaN/infinite values for conditions {dict(conditions or {})}; use "
                "conditions nearer the training range"
            )
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
            self._network = RunFolder.open(self.run_dir, require=EVALUATION_FILES).load_network()
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
            InferenceError: the map's shape differs from the grid, or it is not finite or all zero.
            RunFolderError: ``network_config.json`` or ``model.pt`` is missing or does not fit.
        """
        image = np.asarray(image, dtype=np.float32)
        if image.shape != self.grid_shape:
            raise InferenceError(
                f"map shape {image.shape} differs from the run's grid {self.grid_shape}; resample it first"
            )
        if not np.isfinite(image).all() or image.max() <= 0:
            raise InferenceError("map must be finite with a positive maximum (a modeled-activation map)")
        conditions = {k: v for k, v in (conditions or {}).items() if v is not None}
        meta, mask = self.schema.encode_conditions(conditions, allow_extrapolation)
        net = self.network()
        x = normalise_maps(image[None]).unsqueeze(1)
        with torch.no_grad():
            mu, logvar = net.encode(x, torch.from_numpy(meta[None]), torch.from_numpy(mask[None]))
            imp = net.impute(x)[0][0].numpy() if hasattr(net, "impute") else None
        out = (mu[0].numpy(), logvar[0].numpy())
        if not return_imputed:
            return out
        imputed = {} if imp is None else {s.name: float(s.inverse(imp[j])) for j, s in enumerate(self.schema.fields)}
        return (*out, imputed)


def load(run_dir: str | Path) -> CounterfactualModel:
    """Open a run folder for decoding (and encoding).

    A run folder from someone else must be trusted like code: ``decoder.ts`` is a TorchScript program
    and runs with your permissions (a crafted one can read your files). ``model.pt`` is loaded with
    ``weights_only=True``.

    Raises:
        RunFolderError: a required file is missing, unreadable or inconsistent with the others, or
            ``decoder.ts`` (or ``conditional_mean.ts``) does not give a map in [0, 1] on the grid for z = 0
            and unknown conditions.
    """
    run = RunFolder.open(run_dir, require=INFERENCE_FILES)
    mask = run.mask()
    decoder = run.load_decoder()
    cond_mean = run.load_conditional_mean() if run.has_conditional_mean else None
    return CounterfactualModel(run, decoder, mask, cond_mean)
