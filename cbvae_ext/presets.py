"""The ``cpu`` and ``gpu`` presets, read from the bundle configs with MONAI's ``ConfigParser``: their single source.

``bundle/configs/train.yaml`` holds the CPU preset as top-level knobs (``latent_size``, ``channels``, ...,
``batch_size``, ``resident``, ...) and defines the network once, as ``network_def`` (a ``_target_`` and
its arguments, each an ``@`` reference to a knob or a fixed value); the overlay
``bundle/configs/preset_gpu.yaml`` replaces the knobs that differ. Python code that needs a preset without
a dataset or a run (``cbvae_ext.networks.preset_config``, benchmarks, tests) resolves the same files
here: the architecture is ``network_def``'s arguments as MONAI resolves them, so no key is listed twice.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import yaml

from cbvae_ext.configs import config_dir
from cbvae_ext.errors import CbvaeError

__all__ = [
    "CONFIG_DIR",
    "PRESET_NAMES",
    "TRAINING_KEYS",
    "PresetError",
    "architecture_preset",
    "preset_files",
    "preset_values",
    "training_preset",
]

CONFIG_DIR = config_dir()  # installed package data or the checkout's bundle/configs (cbvae_ext.configs)
PRESET_NAMES: tuple[str, ...] = ("cpu", "gpu")
#: Batch and device settings of a preset (``train.yaml`` top-level keys; the rest are architecture keys).
TRAINING_KEYS: tuple[str, ...] = ("batch_size", "num_workers", "resident", "autocast_dtype", "channels_last", "compile")


class PresetError(CbvaeError, ValueError):
    """An unknown preset, or preset files that cannot be read."""


def preset_files(name: str) -> list[Path]:
    """The config files that make a preset: ``train.yaml`` plus ``preset_<name>.yaml`` (none for ``cpu``)."""
    if name not in PRESET_NAMES:
        raise PresetError(f"unknown network preset {name!r}; valid presets: {', '.join(PRESET_NAMES)}")
    return [CONFIG_DIR / "train.yaml"] + ([] if name == "cpu" else [CONFIG_DIR / f"preset_{name}.yaml"])


#: ``network_def`` arguments that are the run's, not the architecture's (where the data is, the model, the
#: command line's ``--network_overrides``).
_RUN_ARGUMENTS: tuple[str, ...] = ("dataset_dir", "model", "overrides")


@functools.cache
def _load(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    from monai.bundle import ConfigParser

    files = preset_files(name)
    parser = ConfigParser()
    try:
        parser.read_config([str(path) for path in files])
    except (OSError, yaml.YAMLError, ValueError) as err:
        raise PresetError(
            f"cannot read preset files {', '.join(map(str, files))} ({type(err).__name__}); restore them from git"
        ) from None
    block = parser.get("network_def")
    if not isinstance(block, dict):
        raise PresetError(f"{files[0]} has no 'network_def' block; restore it from git")
    keys = [k for k in block if not k.startswith("_") and k not in _RUN_ARGUMENTS]
    try:
        architecture = {k: parser.get_parsed_content(f"network_def#{k}") for k in keys}
        training = {k: parser.get_parsed_content(k) for k in TRAINING_KEYS if k in parser}
    except (KeyError, ValueError) as err:
        raise PresetError(f"cannot resolve the preset {name!r} in {', '.join(map(str, files))}: {err}") from None
    return architecture, training


def architecture_preset(name: str) -> dict[str, Any]:
    """The architecture of a preset: ``network_def``'s arguments (but the run's), resolved (a copy)."""
    return copy.deepcopy(_load(name)[0])


def training_preset(name: str) -> dict[str, Any]:
    """The batch and device settings of a preset (``TRAINING_KEYS``; a copy)."""
    return copy.deepcopy(_load(name)[1])


def preset_values(name: str) -> dict[str, Any]:
    """Every top-level value a preset sets: architecture and training keys together."""
    return {**architecture_preset(name), **training_preset(name)}
