"""Networks of the conditional beta-VAE and its baseline, rebuilt from a JSON-able config.

``build_network(config)`` reads these keys (``network_config`` sizes them from a schema and a grid;
``preset_config`` takes the architecture from the ``network_def`` of the bundle's ``train.yaml``, plus
``preset_gpu.yaml`` for the GPU preset):

- ``model``: ``"cbvae"`` (``ConditionalBetaVAE``) or ``"baseline"`` (``BaselineVAE``).
- ``spatial_shape``, ``latent_size``, ``meta_dim``, ``mask_dim``, ``n_continuous``, ``n_year_bins``.
- architecture: ``channels``, ``block_layers``, ``growth_rate``, ``bn_size``, ``dilations``,
  ``bottleneck_channels``, ``norm``, ``act``; cbvae only: ``film_hidden``, ``imputation_channels``,
  ``adversary_hidden``, ``adversary_input``, ``grl_lambda``; baseline only: ``resnet_widen``, ``resnet_conv1_size``.
- conditioning (cbvae): ``groups`` (``schema.groups``), ``conditioning``, ``cond_mean``, ``cond_mean_rank``,
  ``cond_mean_exact``, ``unknown_tokens``, ``decoder_cond_input``, ``encoder_groups``, ``decoder_groups``,
  ``condition_dropout``; the baseline takes
  ``cond_mean`` (its mean-map bias volume). Their values are ``train.yaml``'s (``network_def``).

Keys a model does not take (e.g. the dataset checksum and grid saved beside the config in
``network_config.json``) are ignored.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn as nn

from cbvae_ext.networks.baseline import BaselineVAE
from cbvae_ext.networks.cbvae import ConditionalBetaVAE, complete_metadata
from cbvae_ext.networks.conditioning import (
    ConditionalMean,
    UnknownTokens,
    drop_conditions,
    groups_config,
    hide_groups,
    initialise_from_data,
)
from cbvae_ext.networks.dense3d import DenseDecoder, DenseEncoder, DilatedDenseBlock, encoder_shapes
from cbvae_ext.networks.film import FiLMGenerator, FiLMNormAct, film
from cbvae_ext.networks.heads import GradientReversal, ImputationHead, YearAdversary, grad_reverse, sample_latent
from cbvae_ext.presets import architecture_preset
from cbvae_ext.schema import MetadataSchema

__all__ = [
    "MODELS",
    "BaselineVAE",
    "ConditionalBetaVAE",
    "ConditionalMean",
    "DenseDecoder",
    "DenseEncoder",
    "DilatedDenseBlock",
    "FiLMGenerator",
    "FiLMNormAct",
    "GradientReversal",
    "ImputationHead",
    "UnknownTokens",
    "YearAdversary",
    "build_network",
    "complete_metadata",
    "count_parameters",
    "drop_conditions",
    "encoder_shapes",
    "film",
    "grad_reverse",
    "groups_config",
    "hide_groups",
    "initialise_from_data",
    "network_config",
    "preset_config",
    "sample_latent",
    "unwrap",
]

MODELS: dict[str, type[nn.Module]] = {"cbvae": ConditionalBetaVAE, "baseline": BaselineVAE}


def _covering_dilations(grid: Sequence[int]) -> list[int]:
    """Shortest doubling sequence 1, 2, 4, ... (at least two layers) whose receptive field spans ``grid``."""
    dilations = [1, 2]
    while sum(dilations) < max(grid) - 1:
        dilations.append(2 * dilations[-1])
    return dilations


def network_config(
    schema: MetadataSchema, spatial_shape: Sequence[int], model: str = "cbvae", **architecture: Any
) -> dict[str, Any]:
    """JSON-able ``build_network`` config: ``architecture`` sized from the metadata schema and the grid.

    Args:
        schema: the dataset's metadata schema (the conditioning sizes and, for the C-β-VAE, its groups).
        spatial_shape: map grid ``(D, H, W)``.
        model: ``"cbvae"`` or ``"baseline"``.
        architecture: the network's keys (``train.yaml``'s ``network_def``: ``latent_size``, ``channels``,
            ..., ``condition_dropout``); ``dilations`` defaults to the shortest sequence covering the
            bottleneck grid.

    Raises:
        ValueError: unknown model.
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; valid models: {', '.join(MODELS)}")
    config: dict[str, Any] = {
        "model": model,
        "spatial_shape": [int(s) for s in spatial_shape],
        "meta_dim": schema.meta_dim,
        "mask_dim": schema.mask_dim,
        "n_continuous": schema.n_continuous,
        "n_year_bins": schema.n_year_bins or 10,
        "norm": "batch",
        "act": "leakyrelu",
        **({"groups": groups_config(schema)} if model == "cbvae" else {}),
        **architecture,
    }
    if "dilations" not in config:
        bottleneck = encoder_shapes(config["spatial_shape"], len(config["block_layers"]))[-1]
        config["dilations"] = _covering_dilations(bottleneck)
    return config


def preset_config(
    name: str, schema: MetadataSchema, spatial_shape: Sequence[int], model: str = "cbvae", **overrides: Any
) -> dict[str, Any]:
    """``network_config`` with the architecture of a preset (``presets.architecture_preset``) and ``overrides``.

    Args:
        name: ``"cpu"`` or ``"gpu"``.
        schema: the dataset's metadata schema.
        spatial_shape: map grid ``(D, H, W)``.
        model: ``"cbvae"`` or ``"baseline"``.
        overrides: keys replacing the preset's values.

    Raises:
        ValueError: unknown preset (``PresetError``) or model.
    """
    return network_config(schema, spatial_shape, model, **{**architecture_preset(name), **overrides})


def build_network(config: Mapping[str, Any]) -> nn.Module:
    """Build ``ConditionalBetaVAE`` or ``BaselineVAE`` from a config (see the module docstring).

    Raises:
        ValueError: unknown ``model`` or a missing key.
    """
    name = config.get("model", "cbvae")
    if name not in MODELS:
        raise ValueError(f"network config: unknown model {name!r}; valid models: {', '.join(MODELS)}")
    cls = MODELS[name]
    params = inspect.signature(cls.__init__).parameters
    missing = [k for k, p in params.items() if k != "self" and p.default is inspect.Parameter.empty and k not in config]
    if missing:
        raise ValueError(f"network config for {name!r} lacks {', '.join(missing)}; build it with preset_config()")
    return cls(**{k: v for k, v in config.items() if k in params})


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def unwrap(network: nn.Module) -> nn.Module:
    """The bare model under DDP / ``torch.compile`` wrappers."""
    while True:
        inner = getattr(network, "module", None)
        inner = getattr(network, "_orig_mod", None) if inner is None else inner
        if not isinstance(inner, nn.Module):
            return network
        network = inner
