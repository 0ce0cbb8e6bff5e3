"""Python side of the bundle configs (``bundle/configs/*.yaml``): switches, the network config and network,
data loaders, run metadata and run finalisation (the knob checks: ``cbvae_ext.engine.knobs``).

Named for what it is; MONAI's own ``monai.engines.workflow`` is the engine base class, unrelated.
Functions the configs call at the start of a run are wrapped in ``exit_on_error``: a bad input prints
one ``error: ...`` line and exits with status 2 instead of a MONAI traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from cbvae_ext.errors import CbvaeError

__all__ = [
    "BundleConfigError",
    "brain_mask",
    "build",
    "exit_on_error",
    "finalize_run",
    "flag",
    "make_loader",
    "network_config",
    "rank",
    "save_network_config",
    "world_size",
]

logger = logging.getLogger(__name__)

_F = TypeVar("_F", bound=Callable[..., Any])


class BundleConfigError(CbvaeError, ValueError):
    """A bundle override has a value the training cannot use."""


def exit_on_error(func: _F) -> _F:
    """Run ``func``; a ``CbvaeError`` prints ``error: <message>`` on stderr and exits with status 2.

    ``SystemExit`` passes through MONAI's config resolver, which wraps other exceptions in long tracebacks.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CbvaeError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]


def flag(value: Any, name: str = "flag") -> bool:
    """Read a CLI boolean: ``true/false/1/0/yes/no`` (any case) or a bool (fire passes ``false`` as a string)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", "none", ""):
        return False
    raise BundleConfigError(f"--{name} must be true or false, got {value!r}")


def rank() -> int:
    """Process rank (0 without torch.distributed)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without torch.distributed)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _dataset_info(dataset_dir: str | Path) -> Any:
    from cbvae_ext.data import load_dataset_info

    return load_dataset_info(dataset_dir)


def network_config(
    dataset_dir: str | Path,
    model: str = "cbvae",
    overrides: Mapping[str, Any] | None = None,
    **architecture: Any,
) -> dict[str, Any]:
    """``build_network`` config for the dataset's grid and schema plus the manifest checksum and grid.

    Args:
        dataset_dir: dataset folder (formats.md).
        model: ``"cbvae"`` or ``"baseline"``.
        overrides: more ``build_network`` keys, applied last (``--network_overrides``).
        architecture: the network's keys (``train.yaml``'s ``network_def`` arguments).

    Raises:
        BundleConfigError, DataError: an unknown model, overrides that are not a mapping, or a dataset
            folder that cannot be read.
    """
    from cbvae_ext.data.sources import file_sha256
    from cbvae_ext.networks import MODELS
    from cbvae_ext.networks import network_config as sized_config

    if model not in MODELS:
        raise BundleConfigError(f"--model must be one of {', '.join(MODELS)}, got {model!r}")
    if not isinstance(overrides or {}, Mapping):
        raise BundleConfigError(
            f"--network_overrides must be a mapping like \"{{'latent_size': 16}}\", got {overrides!r}"
        )
    info = _dataset_info(dataset_dir)
    grid = info.manifest["grid"]
    try:
        config = sized_config(info.schema, grid["shape"], model, **{**architecture, **(overrides or {})})
    except ValueError as err:
        raise BundleConfigError(f"{err}; fix the override") from None
    config["dataset_manifest_sha256"] = file_sha256(Path(dataset_dir) / "manifest.json")
    config["grid"] = grid
    return config


@exit_on_error
def build(
    dataset_dir: str | Path,
    model: str = "cbvae",
    overrides: Mapping[str, Any] | None = None,
    **architecture: Any,
) -> torch.nn.Module:
    """The network of a training run: ``train.yaml``'s ``network_def`` (the network's one definition).

    Sizes the architecture for the dataset (``network_config``) and builds it with
    ``cbvae_ext.networks.build_network``; the config is kept on the network as ``.network_config`` (what
    ``network_config.json`` and the resume fingerprint hold). The knob check catches the values that are
    wrong alone; this catches combinations (e.g. a ``--network_overrides`` value the constructor refuses)
    before anything is written.

    Args:
        dataset_dir: dataset folder (formats.md).
        model: ``"cbvae"`` or ``"baseline"``.
        overrides: more ``build_network`` keys, applied last (``--network_overrides``).
        architecture: the network's keys (``latent_size``, ``channels``, ..., ``condition_dropout``).

    Raises:
        BundleConfigError, DataError: (printed as one ``error:`` line, exit status 2) see ``network_config``,
            or settings the network cannot be built from.
    """
    from cbvae_ext.networks import build_network
    from cbvae_ext.networks.dense3d import set_fast_path

    config = network_config(dataset_dir, model, overrides, **architecture)
    try:
        net = build_network(config)
    except (ValueError, TypeError, RuntimeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BundleConfigError(
            f"cannot build the network from these settings ({first}); fix the architecture knobs or --network_overrides"
        ) from None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun's; the process group does not exist yet
        # under DDP with bf16 autocast the fast path gave a non-finite loss at the second step (the DDP test);
        # until that is understood, several processes train on the plain path (same function, same parameters)
        set_fast_path(net, False)
    net.network_config = config
    return net


def save_network_config(config: dict[str, Any], output_dir: str | Path) -> Path:
    """Write ``network_config.json`` atomically into the run folder (rank 0 only) and return its path.

    The training config calls it after the knobs and the resume checkpoint have been checked, so a
    rejected command leaves an existing run's metadata as it was.
    """
    from cbvae_ext.run_folder import NETWORK_CONFIG, write_json_atomically

    path = Path(output_dir) / NETWORK_CONFIG
    if rank() == 0:
        write_json_atomically(path, config)
    return path


def brain_mask(dataset_dir: str | Path) -> torch.Tensor:
    """The dataset's brain mask as a bool tensor ``[D, H, W]`` (for the reconstruction loss)."""
    return torch.as_tensor(_dataset_info(dataset_dir).mask != 0)


def make_loader(
    dataset_dir: str | Path,
    split: str,
    batch_size: int,
    shuffle: bool = False,
    resident: bool = False,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    seed: int = 0,
    distributed: bool = False,
) -> Any:
    """A loader of dict batches for one split.

    ``resident``: the split's tensors are copied once to ``device`` and sliced there
    (``ResidentBatches``); otherwise a MONAI ``DataLoader`` reads the memory-mapped maps, with a
    ``DistributedSampler`` when ``distributed``.
    """
    from cbvae_ext.data import load_split_tensors, make_dataset
    from cbvae_ext.engine.loaders import ResidentBatches

    if resident:
        tensors = load_split_tensors(dataset_dir, split, torch.device(device))
        tensors = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
        return ResidentBatches(tensors, batch_size, shuffle=shuffle, seed=seed, rank=rank(), world_size=world_size())
    from monai.data import DataLoader, DistributedSampler

    dataset = make_dataset(dataset_dir, split)
    # even_divisible pads a short split by repeating items, so every rank runs the same number of steps
    sampler = DistributedSampler(dataset, shuffle=shuffle, even_divisible=True) if distributed else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda",
        persistent_workers=num_workers > 0,
    )


def finalize_run(
    output_dir: str | Path, dataset_dir: str | Path, network: torch.nn.Module, device: torch.device | str = "cpu"
) -> None:
    """Write the exported artefacts of a finished run (rank 0 only).

    Loads the best weights (``model.pt``) when present, then writes ``latents.parquet``
    (``cbvae_ext.export.write_latents``) and ``decoder.ts``, ``decoder_schema.json`` and ``mask.nii.gz``
    (``export_decoder``, with the per-dimension KL from the latents).
    """
    if rank() != 0:
        return
    from cbvae_ext.engine.step import unwrap
    from cbvae_ext.export import export_decoder, write_latents
    from cbvae_ext.run_folder import MODEL

    out = Path(output_dir)
    model = unwrap(network)
    best = out / MODEL
    if best.is_file():
        model.load_state_dict(torch.load(best, map_location=device, weights_only=True))
    info = _dataset_info(dataset_dir)
    kl = write_latents(model, info, out, device=device)
    export_decoder(
        model,
        info.schema,
        info.mask.shape,
        info.affine,
        info.path / "mask.nii.gz",
        out,
        latent_kl=kl,
        dataset_dir=info.path,
    )
    logger.info(f"run finalised in {out}")
