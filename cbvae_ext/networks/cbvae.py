"""The conditional beta-VAE: conditional-mean path + FiLM-conditioned DenseNet residual, imputation head, year adversary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from cbvae_ext.networks.conditioning import ConditionalMean, UnknownTokens, as_groups, check_groups, drop_conditions
from cbvae_ext.networks.dense3d import DenseDecoder, DenseEncoder, set_fast_path
from cbvae_ext.networks.heads import GradientReversal, ImputationHead, YearAdversary, sample_latent
from cbvae_ext.schema import TOPICS, ConditionGroup

__all__ = ["ADVERSARY_INPUTS", "ConditionalBetaVAE", "complete_metadata"]

#: What the year adversary may read: the latent sample or the posterior mean.
ADVERSARY_INPUTS = ("z", "mu")


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

    Logits are ``conditional_mean(m) + decoder(z, m)``: the conditional mean map of the conditions alone
    (``ConditionalMean``, a low-rank linear map fitted in closed form by ``initialise_from_data``) plus
    the FiLM-conditioned decoder's residual, so ``z`` holds what the conditions do not explain. The
    encoder is FiLM-conditioned on the groups in ``encoder_groups`` of ``[meta, meta_mask]`` as observed
    (missing values are 0 with mask 0). The imputation head predicts every continuous field from the
    map; ``decoder_input`` fills missing continuous fields with it; inside ``decode`` hidden task/topic
    groups are replaced by learned "unknown" tokens. In training, each condition group is hidden with
    probability ``condition_dropout``. The adversary predicts the year bin from ``z`` (or from ``μ``,
    ``adversary_input="mu"``) through a gradient reversal layer whose strength is ``self.grl.lambda_``.

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
        adversary_input: what the adversary reads: ``"z"`` (the sample) or ``"mu"`` (the posterior mean, which
            the post-hoc year probes read: the sample's noise does not hide the year from it).
        norm: MONAI normalisation name/args.
        act: MONAI activation name/args.
        groups: the schema's condition groups (``schema.groups``, or their JSON form ``groups_config``).
        conditioning: False builds the conditioning-off twin (no FiLM, tokens or conditional mean
            beyond a bias volume; ``decode`` ignores ``m``).
        cond_mean: add the conditional-mean path (else logits are the decoder's alone).
        cond_mean_rank: rank of the conditional-mean path.
        cond_mean_exact: condition groups whose entries (values and observed flag) the path keeps exactly,
            outside its rank (``ConditionalMean``'s ``exact``), e.g. ``["terms"]``.
        unknown_tokens: learned tokens for hidden categorical/vector groups.
        decoder_cond_input: also feed ``m`` into the decoder's first (linear) layer.
        encoder_groups: names of the groups the encoder sees (None: all).
        decoder_groups: names of the groups the decoder's FiLM sees (None: all); the others reach the
            map only through the conditional-mean path, so switching them moves the map by that path's change.
        condition_dropout: probability of hiding each condition group in training (or per group name).
        fast_path: run the encoder and decoder on their fast path (``dense3d.set_fast_path``: same
            parameters and function, fewer passes over the finest grids); False: the plain path.
        lean_finest_grid: drop the normalise-FiLM-activate passes on the stem's grid that repeat another
            (``dense3d``: a different network, fewer parameters; False for run folders written before it).
    """

    def __init__(
        self,
        spatial_shape: Sequence[int],
        latent_size: int,
        meta_dim: int,
        mask_dim: int,
        n_continuous: int,
        n_year_bins: int,
        groups: Sequence[ConditionGroup | Sequence[Any]],
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
        adversary_input: str = "z",
        norm: str | tuple = "batch",
        act: str | tuple = "leakyrelu",
        conditioning: bool = True,
        cond_mean: bool = False,
        cond_mean_rank: int = 32,
        cond_mean_exact: Sequence[str] = (),
        unknown_tokens: bool = False,
        decoder_cond_input: bool = False,
        encoder_groups: Sequence[str] | None = None,
        decoder_groups: Sequence[str] | None = None,
        condition_dropout: float | Mapping[str, float] = 0.0,
        fast_path: bool = True,
        lean_finest_grid: bool = False,
    ) -> None:
        super().__init__()
        self.latent_size = latent_size
        self.n_continuous = n_continuous
        self.meta_dim = meta_dim
        self.conditioning = bool(conditioning)
        self.groups = as_groups(groups)
        check_groups(self.groups, meta_dim, mask_dim)
        self.condition_dropout = (
            dict(condition_dropout) if isinstance(condition_dropout, Mapping) else condition_dropout
        )
        cond_dim = meta_dim + mask_dim if self.conditioning else 0
        arch = dict(
            channels=channels,
            block_layers=block_layers,
            growth_rate=growth_rate,
            bn_size=bn_size,
            dilations=dilations,
            bottleneck_channels=bottleneck_channels,
            film_hidden=film_hidden,
            norm=norm,
            act=act,
            lean_finest_grid=lean_finest_grid,
        )
        self.encoder = DenseEncoder(spatial_shape, 2 * latent_size, cond_dim=cond_dim, **arch)
        self.decoder = DenseDecoder(
            spatial_shape, latent_size, cond_dim=cond_dim, cond_input=decoder_cond_input and cond_dim > 0, **arch
        )
        self.imputer = ImputationHead(n_continuous, imputation_channels, len(spatial_shape), norm, act)
        if adversary_input not in ADVERSARY_INPUTS:
            raise ValueError(f"adversary_input must be one of {ADVERSARY_INPUTS}, got {adversary_input!r}")
        self.adversary_input = adversary_input
        self.grl = GradientReversal(grl_lambda)
        self.adversary = YearAdversary(latent_size, n_year_bins, adversary_hidden)
        self.tokens = UnknownTokens(self.groups, meta_dim) if unknown_tokens and self.conditioning else None
        # the conditional mean reads m and, per vector group, m again where that group is hidden: its own
        # linear model for "topics unknown", where the task one-hot must carry what the topics would
        self.register_buffer(
            "vector_flags",
            torch.tensor([meta_dim + g.mask_index for g in self.groups if g.kind == "vector"], dtype=torch.long),
            persistent=False,
        )
        cm_dim = cond_dim * (1 + len(self.vector_flags)) if self.conditioning else 0
        exact = [  # ConditionalMean ignores them when cm_dim is 0 (conditioning off)
            i
            for g in self.groups
            if g.name in cond_mean_exact
            for i in (*range(g.meta_slice.start, g.meta_slice.stop), meta_dim + g.mask_index)
        ]
        self.cond_mean = ConditionalMean(cm_dim, spatial_shape, cond_mean_rank, exact=exact) if cond_mean else None
        # the encoder sees only ``encoder_groups``, the decoder's FiLM only ``decoder_groups``: the others are
        # hidden (0 values, mask 0) before the FiLM, so the decoder's unknown tokens stand in for them
        self.register_buffer("encoder_keep", self._keep(encoder_groups, meta_dim, mask_dim), persistent=False)
        self.register_buffer("decoder_keep", self._keep(decoder_groups, meta_dim, mask_dim), persistent=False)
        # the topic mixture (sums to 1) enters scaled by the square root of its size, so a dominant topic is
        # O(1) like the one-hot and the z-scored fields; the text embedding is already standardised
        scale = torch.ones(meta_dim + mask_dim)
        for g in self.groups:
            if g.name == TOPICS.name:
                scale[g.meta_slice] = float(g.size) ** 0.5
        self.register_buffer("cond_scale", scale, persistent=False)
        set_fast_path(self, fast_path)

    def _keep(self, names: Sequence[str] | None, meta_dim: int, mask_dim: int) -> torch.Tensor:
        """``[meta_dim + mask_dim]`` 1 for the entries of the groups in ``names`` (None: every group), else 0."""
        keep = torch.ones(meta_dim + mask_dim)
        for g in self.groups:
            if names is not None and g.name not in names:
                keep[g.meta_slice] = 0.0
                keep[meta_dim + g.mask_index] = 0.0
        return keep

    def encode(self, x: torch.Tensor, meta: torch.Tensor, meta_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``(mu, logvar)`` of ``x`` given the observed metadata (of ``encoder_groups``)."""
        m = torch.cat([meta, meta_mask], dim=1) * (self.encoder_keep * self.cond_scale) if self.conditioning else None
        mu, logvar = self.encoder(x, m).chunk(2, dim=1)
        return mu, logvar

    def impute(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(imp_mu, imp_logvar)`` of every continuous field, normalised units."""
        return self.imputer(x)

    def decoder_input(self, meta: torch.Tensor, meta_mask: torch.Tensor, imp_mu: torch.Tensor | None) -> torch.Tensor:
        """See ``complete_metadata``."""
        return complete_metadata(meta, meta_mask, imp_mu, self.n_continuous)

    def _condition(self, m: torch.Tensor | None) -> torch.Tensor | None:
        if not self.conditioning or m is None:
            return None
        m = m * self.cond_scale
        return self.tokens(m) if self.tokens is not None else m

    def cond_mean_input(self, m: torch.Tensor) -> torch.Tensor | None:
        """What the conditional-mean path reads: scaled ``m`` with hidden groups' values at 0 (no tokens),
        followed by a copy of it per vector group, zero where that group is observed."""
        if not self.conditioning:
            return None
        m = m * self.cond_scale
        m = self.tokens(m, token=False) if self.tokens is not None else m
        return torch.cat([m, *(m * (1.0 - m[:, i : i + 1]) for i in self.vector_flags.tolist())], dim=1)

    def conditional_mean(self, m: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 1, D, H, W]`` of the conditional mean map given ``m`` alone (no latent).

        Without a conditional-mean path: the decode of the prior mean, ``decode(0, m)``.
        """
        if self.cond_mean is None:
            return self.decode(m.new_zeros(m.shape[0], self.latent_size), m)
        return self.cond_mean(self.cond_mean_input(m)).expand(m.shape[0], -1, -1, -1, -1)

    def decode(self, z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 1, D, H, W]`` of ``z`` under the conditioning vector ``m = [meta, meta_mask]``."""
        return self._decode(z, m)[0]

    def _decode(self, z: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        c = self._condition(m * self.decoder_keep)
        logits = self.decoder(z, c)
        if self.cond_mean is None:
            return logits, None
        mean = self.cond_mean(self.cond_mean_input(m)).expand(z.shape[0], *logits.shape[1:])
        return logits + mean, mean

    def forward(
        self, x: torch.Tensor, meta: torch.Tensor, meta_mask: torch.Tensor, sample: bool | None = None
    ) -> dict[str, torch.Tensor]:
        if self.training and self.conditioning and self.condition_dropout:
            meta, meta_mask = drop_conditions(meta, meta_mask, self.groups, self.condition_dropout)
        mu, logvar = self.encode(x, meta, meta_mask)
        # sample=None: sample in training, the posterior mean in evaluation; validation passes True (a sampled ELBO)
        z = sample_latent(mu, logvar, self.training if sample is None else sample)
        imp_mu, imp_logvar = self.impute(x)
        recon, cond_mean = self._decode(z, self.decoder_input(meta, meta_mask, imp_mu))
        out = {
            "recon": recon,
            "mu": mu,
            "logvar": logvar,
            "z": z,
            "imp_mu": imp_mu,
            "imp_logvar": imp_logvar,
            "year_logits": self.adversary(self.grl(mu if self.adversary_input == "mu" else z)),
        }
        if cond_mean is not None:
            out["cond_mean"] = cond_mean
        return out
