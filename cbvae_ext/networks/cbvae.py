"""The conditional beta-VAE: FiLM-conditioned DenseNet encoder/decoder, imputation head, year adversary."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from cbvae_ext.networks.dense3d import DenseDecoder, DenseEncoder
from cbvae_ext.networks.heads import GradientReversal, ImputationHead, YearAdversary, sample_latent

__all__ = ["ConditionalBetaVAE", "complete_metadata"]


def complete_metadata(
    meta: torch.Tensor, meta_mask: torch.Tensor, imp_mu: torch.Tensor | None, n_continuous: int
) -> torch.Tensor:
    """Decoder conditioning ``[completed meta, meta_mask]``: observed values where the mask is 1, else ``imp_mu``.

    ``imp_mu`` is detached: the imputation head learns only from its own loss, so the reconstruction
    cannot turn imputed values into a second, KL-free latent channel. With ``imp_mu=None`` missing values
    stay at the schema default (normalised 0).
    """
    if imp_mu is not None:
        observed = meta_mask[:, :n_continuous]
        values = torch.lerp(imp_mu.detach().to(meta.dtype), meta[:, :n_continuous], observed)
        meta = torch.cat([values, meta[:, n_continuous:]], dim=1)
    return torch.cat([meta, meta_mask], dim=1)


class ConditionalBetaVAE(nn.Module):
    """Conditional beta-VAE for activation maps.

    The encoder is FiLM-conditioned on ``[meta, meta_mask]`` as observed (missing values are the schema's
    0 with mask 0; imputations do not exist before the encoder runs). The imputation head predicts every
    continuous field from the map; the decoder is FiLM-conditioned on ``decoder_input`` (observed values,
    imputed where missing, plus the mask). The adversary predicts the year bin from ``z`` through a
    gradient reversal layer whose strength is ``self.grl.lambda_``.

    Args:
        spatial_shape: map grid ``(D, H, W)``.
        latent_size: latent dimension L.
        meta_dim: length of ``meta`` (``schema.meta_dim``).
        mask_dim: length of ``meta_mask`` (``schema.mask_dim``).
        n_continuous: continuous fields C (the first C entries of ``meta``).
        n_year_bins: classes of the year adversary.
        channels: stem channels, then channels after each level.
        block_layers: dense layers per level.
        growth_rate: DenseNet growth rate.
        bn_size: DenseNet bottleneck factor.
        dilations: dilations of the bottleneck blocks.
        bottleneck_channels: channels of the flattened bottleneck grid.
        film_hidden: FiLM generator width.
        imputation_channels: width of the imputation head's CNN.
        adversary_hidden: width of the adversary MLP.
        grl_lambda: initial gradient reversal strength.
        norm: MONAI normalisation name/args.
        act: MONAI activation name/args.
    """

    def __init__(
        self,
        spatial_shape: Sequence[int],
        latent_size: int,
        meta_dim: int,
        mask_dim: int,
        n_continuous: int,
        n_year_bins: int,
        channels: Sequence[int],
        block_layers: Sequence[int],
        growth_rate: int,
        bn_size: int,
        dilations: Sequence[int],
        bottleneck_channels: int,
        film_hidden: int = 64,
        imputation_channels: int = 8,
        adversary_hidden: int = 64,
        grl_lambda: float = 1.0,
        norm: str | tuple = "batch",
        act: str | tuple = "leakyrelu",
    ) -> None:
        super().__init__()
        self.latent_size = latent_size
        self.n_continuous = n_continuous
        cond_dim = meta_dim + mask_dim
        arch = dict(
            channels=channels,
            block_layers=block_layers,
            growth_rate=growth_rate,
            bn_size=bn_size,
            dilations=dilations,
            bottleneck_channels=bottleneck_channels,
            cond_dim=cond_dim,
            film_hidden=film_hidden,
            norm=norm,
            act=act,
        )
        self.encoder = DenseEncoder(spatial_shape, 2 * latent_size, **arch)
        self.decoder = DenseDecoder(spatial_shape, latent_size, **arch)
        self.imputer = ImputationHead(n_continuous, imputation_channels, len(spatial_shape), norm, act)
        self.grl = GradientReversal(grl_lambda)
        self.adversary = YearAdversary(latent_size, n_year_bins, adversary_hidden)

    def encode(self, x: torch.Tensor, meta: torch.Tensor, meta_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``(mu, logvar)`` of ``x`` given the observed metadata."""
        mu, logvar = self.encoder(x, torch.cat([meta, meta_mask], dim=1)).chunk(2, dim=1)
        return mu, logvar

    def impute(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(imp_mu, imp_logvar)`` of every continuous field, normalised units."""
        return self.imputer(x)

    def decoder_input(self, meta: torch.Tensor, meta_mask: torch.Tensor, imp_mu: torch.Tensor | None) -> torch.Tensor:
        """See ``complete_metadata``."""
        return complete_metadata(meta, meta_mask, imp_mu, self.n_continuous)

    def decode(self, z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 1, D, H, W]`` of ``z`` under the conditioning vector ``m``."""
        return self.decoder(z, m)

    def forward(self, x: torch.Tensor, meta: torch.Tensor, meta_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        mu, logvar = self.encode(x, meta, meta_mask)
        z = sample_latent(mu, logvar, self.training)
        imp_mu, imp_logvar = self.impute(x)
        recon = self.decode(z, self.decoder_input(meta, meta_mask, imp_mu))
        return {
            "recon": recon,
            "mu": mu,
            "logvar": logvar,
            "z": z,
            "imp_mu": imp_mu,
            "imp_logvar": imp_logvar,
            "year_logits": self.adversary(self.grl(z)),
        }
