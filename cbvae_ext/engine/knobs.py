"""The training knobs, declared once: ``TrainKnobs``.

Each field is one top-level key of ``bundle/configs/train.yaml`` (the values live there and in its
overlays; the command line overrides them as ``--key value``). Its type annotation and metadata (range,
choices, a one-line doc) give:

- the checks: ``train_knobs`` (the config's ``knobs`` item, first in ``initialize``) reads and checks every
  value, so a bad one is one ``error:`` line (exit status 2) before anything is built or written;
- the hyper-parameters every tracker records (``TrainKnobs.hyper_params``: MLflow, W&B, TensorBoard);
- the knob table in ``bundle/docs/architecture.md`` (``knob_table``; ``python -m cbvae_ext.engine.knobs``
  prints it, a test keeps the document equal to it).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from cbvae_ext.engine.bundle_glue import BundleConfigError, exit_on_error, flag

__all__ = ["TrainKnobs", "knob_table", "network_keys", "train_knobs"]

logger = logging.getLogger(__name__)

_NULL_TEXT = ("null", "none")


def _knob(
    doc: str,
    low: float | None = None,
    high: float | None = None,
    *,
    open_low: bool = False,
    open_high: bool = False,
    choices: Callable[[], tuple[str, ...]] | None = None,
) -> Any:
    """A ``TrainKnobs`` field: no default (train.yaml holds the values), the checks in its metadata."""
    meta = {"doc": doc, "low": low, "high": high, "open_low": open_low, "open_high": open_high, "choices": choices}
    return dataclasses.field(metadata=meta)


def _models() -> tuple[str, ...]:
    from cbvae_ext.networks import MODELS

    return tuple(MODELS)


def _presets() -> tuple[str, ...]:
    from cbvae_ext.presets import PRESET_NAMES

    return PRESET_NAMES


@dataclasses.dataclass(frozen=True)
class TrainKnobs:
    """Every training knob, checked (``train_knobs``); booleans given as text (``--resume false``) are bools here."""

    # ---- run
    dataset_dir: str = _knob("dataset folder made by `python -m cbvae_ext.data build` (read only)")
    output_dir: str = _knob("run folder: created, locked while a training writes it; not the dataset folder")
    model: str = _knob("cbvae (the C-β-VAE) or baseline (ResNet-10 VAE, train_baseline.yaml)", choices=_models)
    epochs: int = _knob("passes over the training split (the total: a resumed run stops there too)", 1)
    seed: int = _knob("seed of the initialisation, shuffling and condition dropout", 0)
    device: torch.device = _knob("cpu, cuda or cuda:N (default: cuda:0 when there is one)")
    resume: bool = _knob("continue from checkpoints/; false archives them (checkpoints.old-TIME) and starts afresh")
    experiment_name: str = _knob("MLflow experiment / W&B project name")
    # ---- preset and architecture (train.yaml: CPU preset; preset_gpu.yaml: GPU preset)
    preset: str = _knob("label of the architecture preset; the GPU values come with preset_gpu.yaml", choices=_presets)
    latent_size: int = _knob("latent dimensions (both presets; free_bits is a total over them)", 1)
    channels: list[int] = _knob("encoder widths per level (the decoder mirrors them)", 1)
    block_layers: list[int] = _knob("dense layers per level after the first: len(channels) - 1 entries", 0)
    growth_rate: int = _knob("channels each dense layer adds", 1)
    bn_size: int = _knob("dense-layer bottleneck width, in multiples of growth_rate", 1)
    bottleneck_channels: int = _knob("channels of the dilated block at the coarsest grid", 1)
    film_hidden: int = _knob("hidden width of the FiLM generators (conditions -> per-channel scale, shift)", 1)
    imputation_channels: int = _knob("width of the imputation head's CNN", 1)
    adversary_hidden: int = _knob("hidden width of the year adversary", 1)
    adversary_input: Literal["z", "mu"] = _knob(
        "what the year adversary reads (cbvae): z, the latent sample, or mu, the posterior mean the year probes read"
    )
    resnet_widen: float = _knob("ResNet-10 width factor (baseline only)", 0.0, open_low=True)
    resnet_conv1_size: int = _knob("kernel size of ResNet-10's first convolution (baseline only)", 1)
    condition_dropout: float = _knob(
        "probability each condition group is hidden in training (cbvae)", 0.0, 1.0, open_high=True
    )
    cond_mean_rank: int = _knob("rank of the conditional-mean path (cbvae)", 1)
    task_penalty: Literal["identification", "mse"] = _knob(
        "how the conditional-mean fit picks the task one-hot's ridge penalty on validation: identification (the "
        "task-alone map names its own category) or mse (better likelihood and r, task maps near the mean map)"
    )
    network_overrides: dict[str, Any] = _knob(
        "further build_network keys, applied last, e.g. \"{'decoder_cond_input': True}\" (network_keys())"
    )
    # ---- batches and device
    batch_size: int = _knob("maps per step (per process under torchrun)", 1)
    num_workers: int = _knob("loader worker processes (0: the main process reads the memory map)", 0)
    resident: bool = _knob("copy the whole split to the device once (GPU preset)")
    autocast_dtype: Literal["bfloat16", "float16"] | None = _knob("mixed precision of the forward pass (null: float32)")
    channels_last: bool = _knob("channels_last_3d memory format (faster 3D conv backward with oneDNN)")
    compile: bool = _knob("torch.compile the network")
    # ---- optimisation
    epoch_length: int | None = _knob("iterations per epoch (null: the whole split)", 1)
    val_epoch_length: int | None = _knob("validation iterations per epoch (null: the whole split)", 1)
    lr: float = _knob("AdamW learning rate", 0.0, open_low=True)
    betas: tuple[float, float] = _knob("AdamW betas", 0.0, 1.0, open_high=True)
    weight_decay: float = _knob("AdamW weight decay", 0.0)
    lr_min_factor: float = _knob("cosine schedule floor, as a fraction of lr", 0.0, 1.0)
    grad_clip: float | None = _knob("gradient-norm clip (null: none)", 0.0, open_low=True)
    # ---- objective
    beta: float = _knob("initial KL weight", 0.0)
    free_bits: float = _knob(
        "nats of KL per map the objective does not charge: a total, free_bits / latent_size per dimension "
        "(keep the ratio when changing latent_size; the run log shows it)",
        0.0,
    )
    kl_control: bool = _knob("let the KL controller raise beta (off: fixed beta)")
    kl_scale: Literal["excess", "total"] = _knob(
        "KL share the controller reads: KL / (recon - floor + KL) or KL / loss"
    )
    kl_threshold: float = _knob("raise beta when the KL share stays below this ...", 0.0)
    kl_patience: int = _knob("... for this many consecutive epochs", 1)
    kl_factor: float = _knob("beta multiplier per raise", 1.0, open_low=True)
    kl_cap: float = _knob("highest beta (>= beta)", 0.0)
    grl_gamma: float = _knob("DANN ramp steepness: lambda = lambda_max (2 / (1 + exp(-gamma p)) - 1)", 0.0)
    grl_lambda_max: float = _knob("gradient-reversal strength at the end of the ramp (0: the λ = 0 twin)", 0.0)
    imputation_weight: float = _knob("weight of the imputation head's loss", 0.0)
    adversary_weight: float = _knob("weight of the year adversary's loss", 0.0)
    prior_sigma: float = _knob(
        "sd of the weak N(0, sd²) prior on a missing field (normalised units)", 0.0, open_low=True
    )
    # ---- tracking
    use_mlflow: bool = _knob("MLflow, embedded sqlite store RUN/mlflow.db")
    use_wandb: bool = _knob("Weights & Biases (offline unless WANDB_API_KEY is set)")
    use_tensorboard: bool = _knob("TensorBoard event files under RUN/tensorboard")
    progress: bool = _knob("progress bar on the terminal")
    log_every: int = _knob("iterations between per-step tracking records", 1)

    @property
    def free_bits_per_dimension(self) -> float:
        """The free-bits allowance of one latent dimension: ``free_bits / latent_size`` nats."""
        return self.free_bits / self.latent_size

    def hyper_params(self) -> dict[str, Any]:
        """Every knob, JSON-able (the device and paths as text): what MLflow, W&B and TensorBoard record."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.device | Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


@dataclasses.dataclass(frozen=True)
class _Spec:
    """One field's checks, read from its annotation and metadata."""

    name: str
    hint: Any
    doc: str
    low: float | None
    high: float | None
    open_low: bool
    open_high: bool
    choices: Callable[[], tuple[str, ...]] | None

    @property
    def nullable(self) -> bool:
        return _is_optional(self.hint)

    @property
    def base(self) -> Any:
        """The annotation without ``| None``."""
        if not _is_optional(self.hint):
            return self.hint
        rest = [a for a in typing.get_args(self.hint) if a is not type(None)]
        return rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]  # noqa: UP007 - Literal args


def _is_optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def _specs() -> list[_Spec]:
    hints = typing.get_type_hints(TrainKnobs)
    return [
        _Spec(name=f.name, hint=hints[f.name], **{k: f.metadata[k] for k in f.metadata})
        for f in dataclasses.fields(TrainKnobs)
    ]


def _bounds(spec: _Spec) -> str:
    parts = []
    if spec.low is not None:
        parts.append(f"{'>' if spec.open_low else '>='} {spec.low:g}")
    if spec.high is not None:
        parts.append(f"{'<' if spec.open_high else '<='} {spec.high:g}")
    return " and ".join(parts)


def _describe(spec: _Spec) -> str:
    """What a valid value is, in words (error messages and the knob table say the same)."""
    base, bounds = spec.base, _bounds(spec)
    origin = typing.get_origin(base)
    if base is bool:
        text = "true or false"
    elif base is int:
        text = f"a whole number {bounds}".rstrip()
    elif base is float:
        text = f"a number {bounds}".rstrip()
    elif origin is Literal:
        text = _alternatives([*(["null"] if spec.nullable else []), *map(str, typing.get_args(base))])
    elif base is str:
        text = f"one of {', '.join(spec.choices())}" if spec.choices else "a non-empty text"
    elif origin is list:
        item = "whole numbers" if typing.get_args(base)[0] is int else "numbers"
        text = f"a non-empty list of {item} {bounds}".rstrip()
    elif origin is tuple:
        text = f"{len(typing.get_args(base))} numbers {bounds}".rstrip()
    elif origin is dict:
        text = "a mapping of build_network keys"
    elif base is torch.device:
        text = "cpu, cuda or cuda:N, present on this machine"
    else:  # pragma: no cover - a field of a type this module cannot check
        raise TypeError(f"TrainKnobs.{spec.name}: no check for {base!r}")
    if spec.nullable and origin is not Literal:
        text = f"{text}, or null"
    return text


def _alternatives(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def _refuse(name: str, spec: _Spec, value: Any) -> BundleConfigError:
    return BundleConfigError(f"--{name} must be {_describe(spec)}, got {value!r}")


def _number(name: str, spec: _Spec, value: Any, integer: bool) -> int | float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not integer or float(value).is_integer())
    if ok and spec.low is not None:
        ok = value > spec.low if spec.open_low else value >= spec.low
    if ok and spec.high is not None:
        ok = value < spec.high if spec.open_high else value <= spec.high
    if not ok:
        raise _refuse(name, spec, value)
    return int(value) if integer else float(value)


def _device(name: str, spec: _Spec, value: Any) -> torch.device:
    try:
        device = value if isinstance(value, torch.device) else torch.device(str(value))
    except (RuntimeError, ValueError, TypeError):
        raise _refuse(name, spec, value) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise BundleConfigError(
                f"--{name} {value}: this machine has no CUDA device; pass --{name} cpu, or leave --{name} out "
                "(train.yaml picks cuda:0 when there is one)"
            )
        if (device.index or 0) >= count:
            raise BundleConfigError(
                f"--{name} {value}: this machine has {count} CUDA device(s), cuda:0 .. cuda:{count - 1}"
            )
    elif device.type != "cpu":
        raise _refuse(name, spec, value)
    return device


def _value(name: str, spec: _Spec, value: Any) -> Any:
    """``value`` as the field's type, or ``BundleConfigError`` naming ``--name``."""
    if spec.nullable and (value is None or (isinstance(value, str) and value.strip().lower() in _NULL_TEXT)):
        return None
    base = spec.base
    origin = typing.get_origin(base)
    if base is bool:
        try:
            return flag(value, name)
        except BundleConfigError:
            raise _refuse(name, spec, value) from None
    if base is int or base is float:
        return _number(name, spec, value, integer=base is int)
    if origin is Literal:
        if value not in typing.get_args(base):
            raise _refuse(name, spec, value)
        return value
    if base is str:
        ok = isinstance(value, str | Path) and str(value).strip() != ""
        if not ok or (spec.choices and value not in spec.choices()):
            raise _refuse(name, spec, value)
        return str(value)
    if origin in (list, tuple):
        args = typing.get_args(base)
        ok = isinstance(value, list | tuple) and (len(value) == len(args) if origin is tuple else len(value) > 0)
        if not ok:
            raise _refuse(name, spec, value)
        try:
            items = [_number(name, spec, v, integer=args[0] is int) for v in value]
        except BundleConfigError:
            raise _refuse(name, spec, value) from None
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise BundleConfigError(f"--{name} must be a mapping like \"{{'condition_dropout': 0.5}}\", got {value!r}")
        return dict(value)
    if base is torch.device:
        return _device(name, spec, value)
    raise TypeError(f"TrainKnobs.{name}: no check for {base!r}")  # pragma: no cover


def network_keys() -> tuple[str, ...]:
    """The keys ``--network_overrides`` may set: the constructor arguments of the models in ``MODELS``."""
    import inspect

    from cbvae_ext.networks import MODELS

    keys: set[str] = set()
    for cls in MODELS.values():
        keys |= {k for k in inspect.signature(cls.__init__).parameters if k != "self"}
    return tuple(sorted(keys))


def _check_overrides(overrides: Mapping[str, Any], specs: Mapping[str, _Spec]) -> dict[str, Any]:
    known = network_keys()
    unknown = sorted(str(k) for k in overrides if k not in known)
    if unknown:
        raise BundleConfigError(
            f"--network_overrides: unknown key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(known)}"
        )
    # a key that is also a knob gets the knob's check (e.g. "{'channels': []}"); a per-group mapping of
    # condition_dropout is the network's own form (cbvae_ext.networks.ConditionalBetaVAE)
    return {
        k: _value(f"network_overrides['{k}']", specs[k], v) if k in specs and not isinstance(v, Mapping) else v
        for k, v in overrides.items()
    }


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_output_dir(output_dir: str, dataset_dir: str) -> None:
    """Refuse an output folder the run cannot own, without creating or writing anything."""
    out, data = Path(output_dir).resolve(), Path(dataset_dir).resolve()
    if out == data or data in out.parents:
        raise BundleConfigError(
            f"--output_dir {output_dir} is {'the' if out == data else 'inside the'} dataset folder; "
            "choose a run folder outside it (e.g. runs/NAME)"
        )
    existing = _nearest_existing(out)
    if not existing.is_dir():
        where = "is a file" if existing == out else f"is inside the file {existing}"
        raise BundleConfigError(f"--output_dir {output_dir} {where}; choose a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BundleConfigError(
            f"--output_dir {output_dir}: {existing} is not writable (read-only); choose a writable folder"
        )


def _check_preset(knobs: TrainKnobs) -> None:
    from cbvae_ext.presets import preset_values

    if knobs.preset != "cpu":
        # "--preset gpu" alone only relabels the run: the GPU values live in the overlay
        cpu, named = preset_values("cpu"), preset_values(knobs.preset)
        changed = [k for k in named if named[k] != cpu.get(k)]
        if changed and all(getattr(knobs, k, None) == cpu.get(k) for k in changed if hasattr(knobs, k)):
            raise BundleConfigError(
                f"--preset {knobs.preset} does not change the settings; add the overlay instead: --config_file "
                f"\"['bundle/configs/train.yaml','bundle/configs/preset_{knobs.preset}.yaml']\""
            )
    elif torch.cuda.is_available():
        logger.warning(
            "CUDA is available but the CPU preset is in use; add bundle/configs/preset_gpu.yaml for the GPU one"
        )


@exit_on_error
def train_knobs(**values: Any) -> TrainKnobs:
    """Check every training knob (the config's ``knobs`` item; ``initialize`` runs it first).

    Args:
        values: one value per ``TrainKnobs`` field, as the config resolved them (command-line text included).

    Returns:
        The checked knobs (switches as bools, the device a ``torch.device``).

    Raises:
        BundleConfigError: (printed as one ``error:`` line, exit status 2) a value the training cannot use,
            e.g. ``--free_bits nan``, ``--kl_scale x``, ``--channels "[]"``, an unknown
            ``--network_overrides`` key, ``--device cuda`` without CUDA, ``--output_dir`` on a file.
        MissingExtraError: (one ``error:`` line too) a tracker switched on whose package is not installed.
    """
    specs = {s.name: s for s in _specs()}
    missing, extra = sorted(set(specs) - set(values)), sorted(set(values) - set(specs))
    if missing or extra:  # the config's knobs item and TrainKnobs disagree: a defect, not a user error
        raise TypeError(f"train.yaml knobs: missing {missing}, not TrainKnobs fields {extra}")
    checked = {name: _value(name, spec, values[name]) for name, spec in specs.items()}
    checked["network_overrides"] = _check_overrides(checked["network_overrides"], specs)
    knobs = TrainKnobs(**checked)
    architecture = {**{k: getattr(knobs, k) for k in ("channels", "block_layers")}, **knobs.network_overrides}
    if len(architecture["block_layers"]) != len(architecture["channels"]) - 1:
        raise BundleConfigError(
            f"--block_layers {architecture['block_layers']} needs len(channels) - 1 = "
            f"{len(architecture['channels']) - 1} entries (--channels {architecture['channels']})"
        )
    if knobs.kl_cap < knobs.beta:
        raise BundleConfigError(f"--kl_cap ({knobs.kl_cap}) must be >= --beta ({knobs.beta})")
    _check_preset(knobs)
    _check_output_dir(knobs.output_dir, knobs.dataset_dir)
    from cbvae_ext.engine.tracking import check_trackers

    check_trackers(use_mlflow=knobs.use_mlflow, use_wandb=knobs.use_wandb, use_tensorboard=knobs.use_tensorboard)
    logger.info(
        f"free bits: {knobs.free_bits:g} nats per map over latent_size {knobs.latent_size} = "
        f"{knobs.free_bits_per_dimension:g} per dimension"
    )
    # measured: 1 thread instead of 2 moves the first epoch's loss by 0.1 %, and the runs drift apart from there
    logger.info(
        f"reproducibility: seed {knobs.seed}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
        "the same three give the same losses, another thread count changes the float sums"
    )
    return knobs


def knob_table(train_yaml: str | Path | None = None) -> str:
    """The Markdown table of every knob with its ``train.yaml`` value (``bundle/docs/architecture.md`` holds a copy
    between ``<!-- knobs -->`` markers; a test compares them).

    Args:
        train_yaml: the training config whose values are shown (default: the bundle's ``train.yaml``).
    """
    import yaml

    from cbvae_ext.presets import CONFIG_DIR

    values = yaml.safe_load(Path(train_yaml or CONFIG_DIR / "train.yaml").read_text())

    def shown(value: Any) -> str:
        if isinstance(value, str) and value.startswith("$"):
            return "(computed)"
        return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    rows = ["| knob | train.yaml | values | what it sets |", "| --- | --- | --- | --- |"]
    rows += [f"| `{s.name}` | `{shown(values.get(s.name))}` | {_describe(s)} | {s.doc} |" for s in _specs()]
    return "\n".join(rows)


if __name__ == "__main__":
    print(knob_table())
