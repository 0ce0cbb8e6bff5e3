"""Feature-wise linear modulation (FiLM, Perez et al. 2018): ``h <- gamma * h + beta`` per channel.

A ``FiLMGenerator`` maps the conditioning vector to one ``(gamma, beta)`` pair per conditioned layer;
``FiLMNormAct`` applies normalisation, then the modulation, then the activation. The generator's last
layer starts at zero so every modulation is the identity (gamma = 1, beta = 0) at initialisation.

With ``fast`` (the default) a batch norm's affine transform and the modulation are applied together, as one
per-sample scale and shift (``torch.addcmul``): one pass over the feature map instead of three, forward and
backward, with the same parameters and the same result up to rounding (``scripts/bench_train.py --compare``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers.utils import get_act_layer, get_norm_layer

__all__ = ["FiLMGenerator", "FiLMNormAct", "FiLMParams", "film", "norm_film"]

#: One ``(gamma [B, C], beta [B, C])`` pair, or ``None`` for an unconditioned network.
FiLMParams = tuple[torch.Tensor, torch.Tensor] | None


def _per_voxel(t: torch.Tensor, ndim: int) -> torch.Tensor:
    for _ in range(ndim - 2):  # unsqueeze, not view(shape): keeps the batch size dynamic under tracing
        t = t.unsqueeze(-1)
    return t


def film(x: torch.Tensor, params: FiLMParams) -> torch.Tensor:
    """Modulate ``x [B, C, *spatial]`` per channel; identity when ``params`` is None."""
    if params is None:
        return x
    gamma, beta = params
    return x * _per_voxel(gamma, x.ndim) + _per_voxel(beta, x.ndim)


#: Batch norms whose forward ``norm_film`` reproduces (not ``SyncBatchNorm``, which reduces across ranks).
_PLAIN_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def norm_film(norm: nn.Module, x: torch.Tensor, params: FiLMParams) -> torch.Tensor:
    """``film(norm(x), params)`` in one pass for an affine batch norm: the normalised map times
    ``weight * gamma``, plus ``bias * gamma + beta``. Other norms (or ``params=None``) run as they are.
    """
    if params is None or type(norm) not in _PLAIN_BATCH_NORMS or not norm.affine:
        return film(norm(x), params)
    # the bookkeeping of nn.BatchNorm's forward (running statistics), without its affine step
    momentum = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        momentum = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    use_batch = norm.training or norm.running_mean is None
    running = not norm.training or norm.track_running_stats
    x_hat = F.batch_norm(
        x,
        norm.running_mean if running else None,
        norm.running_var if running else None,
        None,
        None,
        use_batch,
        momentum,
        norm.eps,
    )
    gamma, beta = params
    # in x's dtype (bf16 under autocast), as the unfused path keeps it
    scale = _per_voxel((norm.weight * gamma).to(x_hat.dtype), x.ndim)
    shift = _per_voxel((norm.bias * gamma + beta).to(x_hat.dtype), x.ndim)
    return torch.addcmul(shift, x_hat, scale)


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

    Attributes:
        fast: modulate with ``norm_film`` (see the module docstring); ``dense3d.set_fast_path`` sets it.
    """

    fast = True  # dense3d.set_fast_path

    def __init__(self, spatial_dims: int, channels: int, norm: str | tuple, act: str | tuple) -> None:
        super().__init__()
        self.channels = channels
        self.norm = get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=channels)
        self.act = get_act_layer(name=act)

    def forward(self, x: torch.Tensor, params: FiLMParams = None) -> torch.Tensor:
        return self.act(norm_film(self.norm, x, params) if self.fast else film(self.norm(x), params))
