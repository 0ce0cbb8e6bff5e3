"""The trained runs an evaluation takes: their roles, a run loaded and checked against the dataset, its pass options."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from cbvae_ext.errors import CbvaeError
from cbvae_ext.evaluation.passes import PassOptions
from cbvae_ext.run_folder import EVALUATION_FILES, RunFolder
from cbvae_ext.schema import MetadataSchema

__all__ = ["ROLES", "EvaluationError", "LoadedRun", "Role", "load_run", "pass_options"]


class EvaluationError(CbvaeError, ValueError):
    """A run folder, checkpoint or dataset that cannot be evaluated together."""


@dataclass
class LoadedRun:
    """A trained network ready for evaluation, with the run folder it was read from (the one reader, ``RunFolder``)."""

    folder: RunFolder
    model: torch.nn.Module
    checkpoint_sha256: str
    history: pd.DataFrame | None = field(default=None)

    @property
    def run_dir(self) -> Path:
        return self.folder.path

    @property
    def config(self) -> dict[str, Any]:
        return self.folder.network_config or {}

    @property
    def decoder_schema(self) -> dict[str, Any] | None:
        return self.folder.decoder_schema

    @property
    def kind(self) -> str:
        return self.folder.model_kind

    @property
    def latent_size(self) -> int:
        return self.folder.latent_size

    @property
    def imputed_defaults(self) -> torch.Tensor | None:
        """The normalised value the decoder gets for each missing continuous field (None: not exported)."""
        if self.folder.decoder_schema is None:
            return None
        return torch.from_numpy(self.folder.imputed_default_vector)


def load_run(
    run_dir: str | Path,
    schema: MetadataSchema,
    grid_shape: tuple[int, ...],
    device: str | torch.device = "cpu",
    manifest_sha256: str | None = None,
) -> LoadedRun:
    """Rebuild a run's network, load ``model.pt`` with ``weights_only=True`` and check it against the dataset.

    Args:
        run_dir: training output folder (formats.md "Run folder").
        schema: the evaluation dataset's metadata schema.
        grid_shape: the evaluation dataset's map grid ``(D, H, W)``.
        device: where the network runs.
        manifest_sha256: checksum of the evaluation dataset's ``manifest.json``; a run trained on another
            build is refused, since another build has other splits (training studies could be "test").

    Raises:
        EvaluationError: missing files, another dataset build, or a grid, schema, latent size or state dict
            that does not match.
    """
    run = RunFolder.open(run_dir, require=EVALUATION_FILES)
    run.check_dataset(schema, grid_shape, manifest_sha256)
    # channels_last_3d: oneDNN's 3D convolutions run ~2.7x faster on CPU (scripts/bench_eval.py)
    model = run.load_network(device).to(memory_format=torch.channels_last_3d).eval()
    return LoadedRun(run, model, run.checkpoint_sha256(), run.history())


@dataclass(frozen=True)
class Role:
    """A run the evaluation can take: its CLI key, label, network kind and which likelihood it bounds."""

    key: str
    label: str
    model: str
    conditional: bool


#: The runs, by role. The twins are C-β-VAE networks trained with one change (bundle overlays
#: ``train_uncond.yaml``: conditioning off; ``train_nolambda.yaml``: λ = 0).
ROLES: dict[str, Role] = {
    "cbvae": Role("run_dir", "C-β-VAE", "cbvae", True),
    "baseline": Role("baseline_run_dir", "baseline VAE (ResNet-10)", "baseline", False),
    "uncond": Role("uncond_run_dir", "conditioning-off twin", "cbvae", False),
    "nolambda": Role("nolambda_run_dir", "λ = 0 twin", "cbvae", True),
}


def pass_options(run: LoadedRun, n_prior_samples: int, **overrides: Any) -> PassOptions:
    """``run``'s ``PassOptions``: missing fields at its imputation defaults, ``overrides`` on top."""
    base = {"n_prior_samples": n_prior_samples, "imputed_defaults": run.imputed_defaults}
    return PassOptions(**{**base, **overrides})
