"""Python side of the bundle configs (``bundle/configs/*.yaml``): knob checks, switches, the network config,
data loaders, run metadata and run finalisation.

Named for what it is; MONAI's own ``monai.engines.workflow`` is the engine base class, unrelated.
Functions the configs call at the start of a run are wrapped in ``exit_on_error``: a bad input prints
one ``error: ...`` line and exits with status 2 instead of a MONAI traceback.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from cbvae_ext.errors import CbvaeError

__all__ = [
    "BundleConfigError",
    "brain_mask",
    "check_knobs",
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


def _number(
    name: str, value: Any, low: float, high: float = math.inf, integer: bool = False, open_low: bool = False
) -> None:
    kind = "a whole number" if integer else "a number"
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = (
        ok
        and (not integer or float(value).is_integer())
        and (value > low if open_low else value >= low)
        and value <= high
    )
    if not ok:
        bound = f"> {low:g}" if open_low else f">= {low:g}"
        bound += f" and <= {high:g}" if math.isfinite(high) else ""
        raise BundleConfigError(f"--{name} must be {kind} {bound}, got {value!r}")


#: Knobs that must be whole numbers ``>= low`` (``None`` allowed where marked).
_WHOLE: dict[str, tuple[int, bool]] = {
    "epochs": (1, False),
    "seed": (0, False),
    "batch_size": (1, False),
    "num_workers": (0, False),
    "latent_size": (1, False),
    "kl_patience": (1, False),
    "log_every": (1, False),
    "epoch_length": (1, True),
    "val_epoch_length": (1, True),
}
#: Knobs that must be finite numbers: (lowest, highest, lowest excluded).
_REAL: dict[str, tuple[float, float, bool]] = {
    "lr": (0.0, math.inf, True),
    "weight_decay": (0.0, math.inf, False),
    "lr_min_factor": (0.0, 1.0, False),
    "grad_clip": (0.0, math.inf, True),
    "beta": (0.0, math.inf, False),
    "kl_threshold": (0.0, math.inf, False),
    "kl_factor": (1.0, math.inf, True),
    "kl_cap": (0.0, math.inf, False),
    "grl_gamma": (0.0, math.inf, False),
    "grl_lambda_max": (0.0, math.inf, False),
    "imputation_weight": (0.0, math.inf, False),
    "adversary_weight": (0.0, math.inf, False),
    "prior_sigma": (0.0, math.inf, True),
}
_SWITCHES = ("resident", "channels_last", "compile", "resume", "progress", "use_mlflow", "use_wandb", "use_tensorboard")
_AUTOCAST = (None, "bfloat16", "float16")


@exit_on_error
def check_knobs(**knobs: Any) -> dict[str, Any]:
    """Check the training knobs once, before anything is built or written (``initialize`` calls it first).

    Knobs it does not know are accepted (overlays add their own). A CUDA device with the CPU preset
    logs a hint to add ``preset_gpu.yaml``.

    Returns:
        The knobs, unchanged.

    Raises:
        BundleConfigError: (printed as one ``error:`` line, exit status 2) a value the training cannot use,
            e.g. ``--lr nan``, ``--epochs abc``, ``--latent_size 0``.
    """
    for name, (low, nullable) in _WHOLE.items():
        if name in knobs and not (nullable and knobs[name] is None):
            _number(name, knobs[name], low, integer=True)
    for name, (low, high, open_low) in _REAL.items():
        if name in knobs and not (name == "grad_clip" and knobs[name] is None):
            _number(name, knobs[name], low, high, open_low=open_low)
    for name in _SWITCHES:
        if name in knobs:
            flag(knobs[name], name)
    betas = knobs.get("betas", (0.9, 0.999))
    if not (isinstance(betas, list | tuple) and len(betas) == 2):
        raise BundleConfigError(f"--betas must be two numbers in [0, 1), got {betas!r}")
    for value in betas:
        _number("betas", value, 0.0, 0.999999)
    if knobs.get("autocast_dtype") not in _AUTOCAST:
        raise BundleConfigError(f"--autocast_dtype must be null, bfloat16 or float16, got {knobs['autocast_dtype']!r}")
    if "kl_cap" in knobs and "beta" in knobs and knobs["kl_cap"] < knobs["beta"]:
        raise BundleConfigError(f"--kl_cap ({knobs['kl_cap']}) must be >= --beta ({knobs['beta']})")
    _check_preset(knobs)
    return knobs


def _check_preset(knobs: Mapping[str, Any]) -> None:
    from cbvae_ext.presets import PRESET_NAMES, preset_values

    name = knobs.get("preset")
    if name is None:
        return
    if name not in PRESET_NAMES:
        raise BundleConfigError(f"--preset must be one of {', '.join(PRESET_NAMES)}, got {name!r}")
    if name != "cpu":
        # "--preset gpu" alone only relabels the run: the GPU values live in the overlay
        cpu, named = preset_values("cpu"), preset_values(name)
        changed = [k for k in named if named[k] != cpu.get(k)]
        if changed and all(knobs.get(k) == cpu.get(k) for k in changed if k in knobs):
            raise BundleConfigError(
                f"--preset {name} does not change the settings; add the overlay instead: --config_file "
                f"\"['bundle/configs/train.yaml','bundle/configs/preset_{name}.yaml']\""
            )
    elif torch.cuda.is_available():
        logger.warning(
            "CUDA is available but the CPU preset is in use; add bundle/configs/preset_gpu.yaml for the GPU one"
        )


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


@exit_on_error
def network_config(
    dataset_dir: str | Path,
    preset: str,
    model: str = "cbvae",
    architecture: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``build_network`` config for the dataset's grid and schema plus the manifest checksum and grid.

    Args:
        dataset_dir: dataset folder (formats.md).
        preset: ``"cpu"`` or ``"gpu"``: defaults for architecture keys the config does not set.
        model: ``"cbvae"`` or ``"baseline"``.
        architecture: the config's architecture keys (``train.yaml``'s ``architecture`` block).
        overrides: more ``build_network`` keys, applied last (``network_overrides``).

    Raises:
        BundleConfigError, DataError: (printed as one ``error:`` line, exit status 2) an unknown model or
            preset, or a dataset folder that cannot be read.
    """
    from cbvae_ext.data.sources import file_sha256
    from cbvae_ext.networks import MODELS, preset_config

    if model not in MODELS:
        raise BundleConfigError(f"--model must be one of {', '.join(MODELS)}, got {model!r}")
    if not isinstance(overrides or {}, Mapping):
        raise BundleConfigError(
            f"--network_overrides must be a mapping like \"{{'latent_size': 16}}\", got {overrides!r}"
        )
    info = _dataset_info(dataset_dir)
    grid = info.manifest["grid"]
    try:
        config = preset_config(
            preset, info.schema, grid["shape"], model=model, **{**(architecture or {}), **(overrides or {})}
        )
    except ValueError as err:
        raise BundleConfigError(f"{err}; fix the override") from None
    config["dataset_manifest_sha256"] = file_sha256(Path(dataset_dir) / "manifest.json")
    config["grid"] = grid
    return config


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
