"""The baseline: an unconditioned VAE with a MONAI ResNet-10 encoder and the same decoder family."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.nets import resnet10

from cbvae_ext.networks.cbvae import complete_metadata
from cbvae_ext.networks.conditioning import ConditionalMean
from cbvae_ext.networks.dense3d import DenseDecoder, SpaceToDepth
from cbvae_ext.networks.heads import sample_latent

__all__ = ["BaselineVAE"]


class BaselineVAE(nn.Module):
    """VAE without conditioning, imputation or adversary, for a fair comparison with ``ConditionalBetaVAE``.

    The encoder is MONAI's ``resnet10`` on the same space-to-depth 2x input as the dense encoder's stem
    (so its first convolution is stride 1, and no max pooling), read before its global pooling:
    the last feature grid is flattened into a linear layer, like the dense encoder's, so both keep the
    spatial layout. The decoder is ``DenseDecoder`` with the same settings and no FiLM; ``decode(z, m)``
    accepts ``m`` and ignores it. With ``cond_mean`` the logits are a learned bias volume (initialised to
    the logit of the training mean map by ``initialise_from_data``) plus the decoder: training starts
    near the mean-map model instead of below it.

    Args:
        spatial_shape: map grid ``(D, H, W)``.
        latent_size: latent dimension L.
        meta_dim: length of ``meta`` (kept for the shared interface).
        mask_dim: length of ``meta_mask`` (kept for the shared interface).
        n_continuous: continuous fields C.
        channels: decoder channels (as ``DenseDecoder``).
        block_layers: decoder dense layers per level.
        growth_rate: decoder growth rate.
        bn_size: decoder bottleneck factor.
        dilations: dilations of the decoder's bottleneck block.
        bottleneck_channels: channels of the decoder's bottleneck grid.
        resnet_widen: ResNet-10 width factor (1.0 = 64..512 channels).
        resnet_conv1_size: kernel size of ResNet-10's first convolution.
        norm: MONAI normalisation name/args for the decoder.
        act: MONAI activation name/args for the decoder.
        cond_mean: add the mean-map bias volume to the logits.
    """

    def __init__(
        self,
        spatial_shape: Sequence[int],
        latent_size: int,
        meta_dim: int,
        mask_dim: int,
        n_continuous: int,
        channels: Sequence[int],
        block_layers: Sequence[int],
        growth_rate: int,
        bn_size: int,
        dilations: Sequence[int],
        bottleneck_channels: int,
        resnet_widen: float = 1.0,
        resnet_conv1_size: int = 7,
        norm: str | tuple = "batch",
        act: str | tuple = "leakyrelu",
        cond_mean: bool = False,
    ) -> None:
        super().__init__()
        self.latent_size = latent_size
        self.n_continuous = n_continuous
        sd = len(spatial_shape)
        self.space_to_depth = SpaceToDepth(spatial_shape)
        self.resnet = resnet10(
            spatial_dims=sd,
            n_input_channels=2**sd,
            conv1_t_size=resnet_conv1_size,
            conv1_t_stride=1,
            no_max_pool=True,
            feed_forward=False,
            widen_factor=resnet_widen,
        )
        grid = [(int(s) + 1) // 2 for s in spatial_shape]
        for _ in range(3):  # layers 2-4 halve (kernel 3, padding 1: rounded up)
            grid = [(s + 1) // 2 for s in grid]
        self.fc = nn.Linear(self.resnet.layer4[-1].conv2.out_channels * math.prod(grid), 2 * latent_size)
        self.decoder = DenseDecoder(
            spatial_shape,
            latent_size,
            channels,
            block_layers,
            growth_rate,
            bn_size,
            dilations,
            bottleneck_channels,
            cond_dim=0,
            norm=norm,
            act=act,
        )
        self.cond_mean = ConditionalMean(0, spatial_shape, 0) if cond_mean else None

    def encode(self, x: torch.Tensor, meta: torch.Tensor, meta_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``(mu, logvar)``; ``meta``/``meta_mask`` are ignored."""
        r = self.resnet
        h = r.act(r.bn1(r.conv1(self.space_to_depth(x))))
        h = r.layer4(r.layer3(r.layer2(r.layer1(h))))
        mu, logvar = self.fc(h.flatten(1)).chunk(2, dim=1)
        return mu, logvar

    def decoder_input(self, meta: torch.Tensor, meta_mask: torch.Tensor, imp_mu: torch.Tensor | None) -> torch.Tensor:
        """Same layout as the conditional model's (the baseline's decoder ignores it)."""
        return complete_metadata(meta, meta_mask, imp_mu, self.n_continuous)

    def decode(self, z: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, 1, D, H, W]``; ``m`` is ignored."""
        logits = self.decoder(z)
        return logits if self.cond_mean is None else logits + self.cond_mean(None)

    def conditional_mean(self, m: torch.Tensor) -> torch.Tensor:
        """Logits of the model's map with no latent information: ``decode(0, m)``."""
        return self.decode(m.new_zeros(m.shape[0], self.latent_size), m)

    def forward(
        self, x: torch.Tensor, meta: torch.Tensor, meta_mask: torch.Tensor, sample: bool | None = None
    ) -> dict[str, torch.Tensor | None]:
        mu, logvar = self.encode(x, meta, meta_mask)
        # sample=None: sample in training, the posterior mean in evaluation; validation passes True (a sampled ELBO)
        z = sample_latent(mu, logvar, self.training if sample is None else sample)
        return {
            "recon": self.decode(z),
            "mu": mu,
            "logvar": logvar,
            "z": z,
            "imp_mu": None,
            "imp_logvar": None,
            "year_logits": None,
        }
