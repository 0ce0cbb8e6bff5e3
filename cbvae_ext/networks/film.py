"""Feature-wise linear modulation (FiLM, Perez et al. 2018): ``h <- gamma * h + beta`` per channel.

A ``FiLMGenerator`` maps the conditioning vector to one ``(gamma, beta)`` pair per conditioned layer;
``FiLMNormAct`` applies normalisation, then the modulation, then the activation. The generator's last
layer starts at zero so every modulation is the identity (gamma = 1, beta = 0) at initialisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.layers.utils import get_act_layer, get_norm_layer

__all__ = ["FiLMGenerator", "FiLMNormAct", "FiLMParams", "film"]

#: One ``(gamma [B, C], beta [B, C])`` pair, or ``None`` for an unconditioned network.
FiLMParams = tuple[torch.Tensor, torch.Tensor] | None


def film(x: torch.Tensor, params: FiLMParams) -> torch.Tensor:
    """Modulate ``x [B, C, *spatial]`` per channel; identity when ``params`` is None."""
    if params is None:
        return x
    gamma, beta = params
    for _ in range(x.ndim - 2):  # unsqueeze, not view(shape): keeps the batch size dynamic under tracing
        gamma, beta = gamma.unsqueeze(-1), beta.unsqueeze(-1)
    return x * gamma + beta


class FiLMGenerator(nn.Module):
    """Small MLP from the conditioning vector to ``(gamma, beta)`` for every conditioned layer.

    Args:
        cond_dim: length of the conditioning vector.
        channels: channel count of each conditioned layer, in the order the network calls them.
        hidden: width of the hidden layer.
    """

    def __init__(self, cond_dim: int, channels: Sequence[int], hidden: int) -> None:
        super().__init__()
        self.channels = [int(c) for c in channels]
        self.mlp = nn.Sequential(
            nn.Linear(cond_dim, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 2 * sum(self.channels)),
        )
        # identity modulation at init: training starts from the unconditioned network
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, m: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = self.mlp(m)
        params = []
        for chunk in torch.split(out, [2 * c for c in self.channels], dim=1):
            d_gamma, beta = chunk.chunk(2, dim=1)
            params.append((1.0 + d_gamma, beta))
        return params


class FiLMNormAct(nn.Module):
    """Normalisation, then FiLM, then activation (FiLM sits after normalisation, as in the paper).

    Args:
        spatial_dims: number of spatial dimensions.
        channels: number of channels.
        norm: MONAI normalisation name/args.
        act: MONAI activation name/args.
    """

    def __init__(self, spatial_dims: int, channels: int, norm: str | tuple, act: str | tuple) -> None:
        super().__init__()
        self.channels = channels
        self.norm = get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=channels)
        self.act = get_act_layer(name=act)

    def forward(self, x: torch.Tensor, params: FiLMParams = None) -> torch.Tensor:
        return self.act(film(self.norm(x), params))
