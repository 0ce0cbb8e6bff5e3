"""Heads around the latent: sampling, metadata imputation from the map, the year adversary behind gradient reversal."""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Pool

__all__ = ["GradientReversal", "ImputationHead", "YearAdversary", "grad_reverse", "sample_latent"]


def sample_latent(mu: torch.Tensor, logvar: torch.Tensor, training: bool) -> torch.Tensor:
    """Reparameterisation trick in training (``mu + sigma * eps``); the posterior mean in evaluation."""
    if not training:
        return mu
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


class _GradReverse(torch.autograd.Function):
    """Identity forward, ``-lambda * grad`` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lambda_: float) -> torch.Tensor:  # type: ignore[override]
        ctx.lambda_ = lambda_
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return -ctx.lambda_ * grad, None


def grad_reverse(x: torch.Tensor, lambda_: float = 1.0) -> torch.Tensor:
    """Gradient reversal (Ganin & Lempitsky 2015): identity forward, ``-lambda_ * grad`` backward."""
    return _GradReverse.apply(x, float(lambda_))


class GradientReversal(nn.Module):
    """Gradient reversal layer whose strength ``lambda_`` (a plain float) a handler may schedule.

    Args:
        lambda_: reversal strength; 0 cuts the adversary's gradient into the encoder.
    """

    def __init__(self, lambda_: float = 1.0) -> None:
        super().__init__()
        self.lambda_ = float(lambda_)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_reverse(x, self.lambda_)

    def extra_repr(self) -> str:
        return f"lambda_={self.lambda_}"


class ImputationHead(nn.Module):
    """Predicts ``(mu, logvar)`` of every continuous metadata field (normalised units) from the map alone.

    It has its own small unconditioned CNN (4x average pooling, two stride-2 convs, global pooling), so it
    never sees the values it predicts: the encoder's FiLM input holds the observed values.

    Args:
        n_fields: number of continuous fields (C).
        channels: channels of the first conv (the second has twice as many).
        spatial_dims: number of spatial dimensions.
        norm: MONAI normalisation name/args.
        act: MONAI activation name/args.
    """

    def __init__(
        self,
        n_fields: int,
        channels: int = 8,
        spatial_dims: int = 3,
        norm: str | tuple = "batch",
        act: str | tuple = "leakyrelu",
    ) -> None:
        super().__init__()
        self.n_fields = n_fields
        self.features = nn.Sequential(
            Pool[Pool.AVG, spatial_dims](kernel_size=4, stride=4, ceil_mode=True),
            Convolution(spatial_dims, 1, channels, strides=2, kernel_size=3, norm=norm, act=act),
            Convolution(spatial_dims, channels, 2 * channels, strides=2, kernel_size=3, norm=norm, act=act),
            Pool[Pool.ADAPTIVEAVG, spatial_dims](1),
            nn.Flatten(1),
        )
        self.out = nn.Linear(2 * channels, 2 * n_fields)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.out(self.features(x)).chunk(2, dim=1)
        return mu, logvar


class YearAdversary(nn.Module):
    """Small MLP predicting the year bin from ``z`` (put a ``GradientReversal`` in front of it).

    Args:
        latent_size: latent dimension.
        n_bins: number of year bins.
        hidden: hidden width.
    """

    def __init__(self, latent_size: int, n_bins: int, hidden: int = 64) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(latent_size, hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, n_bins))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.mlp(z)
