"""The ``cpu`` and ``gpu`` presets, read from the bundle configs: their single source.

``bundle/configs/train.yaml`` holds the CPU preset as top-level keys (``latent_size``, ``channels``,
..., ``batch_size``, ``resident``, ...) and lists the ``build_network`` ones in its ``architecture``
block; the overlay ``bundle/configs/preset_gpu.yaml`` replaces them for the GPU preset. Python code that
needs a preset without the bundle (``cbvae_ext.networks.preset_config``, benchmarks, tests) reads the same
files here.
"""

from __future__ import annotations

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


@functools.cache
def _load(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    merged: dict[str, Any] = {}
    for path in preset_files(name):
        try:
            merged.update(yaml.safe_load(path.read_text()) or {})
        except (OSError, yaml.YAMLError) as err:
            raise PresetError(f"cannot read preset file {path} ({type(err).__name__}); restore it from git") from None
    block = merged.get("architecture")
    if not isinstance(block, dict):
        raise PresetError(f"{CONFIG_DIR / 'train.yaml'} has no 'architecture' block; restore it from git")
    architecture = {}
    for key, value in block.items():
        # the block lists "@key" references to the top-level keys; anything else is taken literally
        ref = value[1:] if isinstance(value, str) and value.startswith("@") else None
        if ref is not None and ref not in merged:
            raise PresetError(f"architecture#{key} refers to @{ref}, which is not a top-level key of the preset files")
        architecture[key] = merged[ref] if ref is not None else value
    training = {k: merged[k] for k in TRAINING_KEYS if k in merged}
    return architecture, training


def architecture_preset(name: str) -> dict[str, Any]:
    """The ``build_network`` architecture keys of a preset (a copy)."""
    return dict(_load(name)[0])


def training_preset(name: str) -> dict[str, Any]:
    """The batch and device settings of a preset (``TRAINING_KEYS``; a copy)."""
    return dict(_load(name)[1])


def preset_values(name: str) -> dict[str, Any]:
    """Every top-level value a preset sets: architecture and training keys together."""
    return {**architecture_preset(name), **training_preset(name)}
