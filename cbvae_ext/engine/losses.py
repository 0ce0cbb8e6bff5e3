"""The C-β-VAE objective with per-term outputs.

Per map (then averaged over the batch)::

    loss = recon + β·KL + w_imp·imp + w_adv·adv

- ``recon``: Bernoulli cross-entropy with soft targets, ``BCEWithLogits(logits, x)`` summed over the
  in-mask voxels. Maps lie in [0, 1] and peak at 1 (formats.md), so each voxel is read as the
  probability of "activated" (independent voxels). It is not a normalised density on [0, 1] (the
  continuous Bernoulli adds a prediction-dependent normaliser), but per voxel it is a proper scoring
  rule, minimal exactly when ``sigmoid(logits) == x``. Voxels outside the brain mask carry no data.
- ``floor``: the smallest value ``recon`` can take, the targets' summed Bernoulli entropy
  ``-Σ [x log x + (1 - x) log(1 - x)]`` (reached at ``sigmoid(logits) == x``). ``recon - floor`` is the
  excess reconstruction loss, the scale on which the KL controller compares the KL term.
- ``kl``: ``KL(q(z|x, m) || N(0, I))`` summed over latent dimensions. With ``free_bits`` F > 0 the
  objective uses ``Σ_d max(KL_d, F / L)`` (batch-mean KL per dimension, Kingma et al. 2016), so the
  encoder gains nothing from pushing a dimension below F / L nats; ``kl`` still reports the true KL.
- ``cm``: the same cross-entropy for the conditional-mean path's logits (``out["cond_mean"]``, the
  map from the conditions alone), reported beside the loss (that path is fitted in closed form, not by
  this loss); 0 for a model without it.
- ``imp``: Gaussian negative log-likelihood of the observed continuous metadata (normalised units)
  under the imputation head ``N(imp_mu, exp(imp_logvar))``; where a field is missing, the head is pulled
  towards a weak prior ``N(0, σ_p²)`` by ``KL(N(imp_mu, σ²) || N(0, σ_p²))`` -- no target is invented.
- ``adv``: cross-entropy of the year-bin adversary on rows whose year is known (``year_bin >= 0``); the
  gradient reversal layer inside the network makes the encoder work against it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CBVAELoss", "LossError"]

_LOG_2PI = math.log(2.0 * math.pi)


class LossError(ValueError):
    """The network output or the batch does not match what the loss needs."""


class CBVAELoss(nn.Module):
    """ELBO + imputation + adversarial loss returning every term.

    Args:
        mask: brain mask on the map grid (``[D, H, W]``, nonzero = in brain); ``None`` uses every voxel.
        beta: initial KL weight; the ``KLController`` changes ``self.beta`` during training.
        imputation_weight: weight of the imputation term.
        adversary_weight: weight of the adversary's cross-entropy.
        prior_sigma: standard deviation σ_p of the weak prior on a missing field (normalised units).
        free_bits: total nats of KL (spread evenly over the latent dimensions) the objective does not charge.

    Attributes:
        fast: compute the map terms on the in-mask voxels alone, gathered once (about a fifth of the 4 mm
            grid); False: on the whole grid times the mask. Same values up to rounding
            (``cbvae_ext.networks.dense3d.set_fast_path`` switches it).

    Raises:
        LossError: for a non-positive ``prior_sigma`` or negative weights.
    """

    fast = True

    def __init__(
        self,
        mask: torch.Tensor | None = None,
        beta: float = 1.0,
        imputation_weight: float = 1.0,
        adversary_weight: float = 1.0,
        prior_sigma: float = 3.0,
        free_bits: float = 0.0,
    ) -> None:
        super().__init__()
        if prior_sigma <= 0:
            raise LossError(f"prior_sigma must be > 0, got {prior_sigma}")
        if min(beta, imputation_weight, adversary_weight, free_bits) < 0:
            raise LossError("beta, imputation_weight, adversary_weight and free_bits must be >= 0")
        self.free_bits = float(free_bits)
        self.beta = float(beta)
        self.imputation_weight = float(imputation_weight)
        self.adversary_weight = float(adversary_weight)
        self.prior_sigma = float(prior_sigma)
        mask_t = torch.ones(1) if mask is None else torch.as_tensor(mask) != 0
        self.register_buffer("mask", mask_t.to(torch.float32), persistent=False)
        inside = torch.nonzero(mask_t.flatten()).flatten() if mask_t.dim() > 1 else None
        self.register_buffer("inside", inside, persistent=False)  # flat indices of the in-mask voxels

    def _in_mask(self, maps: torch.Tensor) -> torch.Tensor:
        """``[B, 1, D, H, W]`` -> ``[B, V]`` float32: the in-mask voxels (fast), else the whole grid."""
        if self.mask.dim() > 1 and tuple(maps.shape[-3:]) != tuple(self.mask.shape):
            raise LossError(f"recon grid {tuple(maps.shape[-3:])} differs from mask grid {tuple(self.mask.shape)}")
        flat = maps.float().flatten(1)
        return flat.index_select(1, self.inside) if self.fast and self.inside is not None else flat

    def _sum(self, values: torch.Tensor) -> torch.Tensor:
        """Per-map sum over the in-mask voxels of ``_in_mask`` values, ``[B]``."""
        return (values if self.fast and self.inside is not None else values * self.mask.flatten()).sum(1)

    def _bce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._sum(F.binary_cross_entropy_with_logits(logits, target, reduction="none"))

    def _entropy(self, x: torch.Tensor) -> torch.Tensor:
        return self._sum(-(torch.special.xlogy(x, x) + torch.special.xlogy(1.0 - x, 1.0 - x)))

    def reconstruction(self, logits: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Per-map Bernoulli NLL over in-mask voxels, ``[B]``."""
        return self._bce(self._in_mask(logits), self._in_mask(image))

    def floor(self, image: torch.Tensor) -> torch.Tensor:
        """Per-map summed entropy of the soft targets over in-mask voxels (the minimum of ``reconstruction``), ``[B]``."""
        return self._entropy(self._in_mask(image))

    @staticmethod
    def kl(mu: torch.Tensor, logvar: torch.Tensor, per_dim: bool = False) -> torch.Tensor:
        """Per-map ``KL(N(mu, exp(logvar)) || N(0, I))`` summed over latents, ``[B]`` (``[B, L]`` with ``per_dim``)."""
        mu, logvar = mu.float(), logvar.float()
        kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar)
        return kl if per_dim else kl.sum(1)

    def imputation(
        self, imp_mu: torch.Tensor, imp_logvar: torch.Tensor, target: torch.Tensor, observed: torch.Tensor
    ) -> torch.Tensor:
        """Per-map Gaussian NLL where observed plus the weak-prior KL where missing, ``[B]``."""
        imp_mu, imp_logvar = imp_mu.float(), imp_logvar.float()
        nll = 0.5 * (_LOG_2PI + imp_logvar + (target - imp_mu).square() / imp_logvar.exp())
        log_sp2 = 2.0 * math.log(self.prior_sigma)
        prior_kl = 0.5 * (log_sp2 - imp_logvar + (imp_logvar.exp() + imp_mu.square()) / self.prior_sigma**2 - 1.0)
        return torch.where(observed > 0, nll, prior_kl).sum(1)

    def forward(
        self,
        out: Mapping[str, torch.Tensor | None],
        batch: Mapping[str, torch.Tensor],
        beta: float | None = None,
        adversary: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Compute every term.

        Args:
            out: network output (formats.md network contract).
            batch: dataset batch with ``image``, ``meta``, ``meta_mask`` and ``year_bin``.
            beta: KL weight to use instead of ``self.beta`` (validation uses 1, the plain ELBO).
            adversary: include the adversary term in ``loss``.

        Returns:
            0-d tensors ``loss`` (differentiable), ``recon``, ``floor``, ``kl``, ``cm``, ``imp``, ``adv`` and
            ``adv_acc`` (batch means; ``adv_acc`` is NaN when no row has a known year or the model has no
            adversary).
        """
        try:
            image, logits, mu, logvar = batch["image"], out["recon"], out["mu"], out["logvar"]
        except KeyError as err:
            raise LossError(f"missing {err} in the network output or batch; see formats.md") from None
        voxels = self._in_mask(image)  # gathered once for the three terms that read it
        recon = self._bce(self._in_mask(logits), voxels).mean()
        kl_dims = self.kl(mu, logvar, per_dim=True).mean(0)
        kl = kl_dims.sum()
        # free bits shape the training objective only; a given beta (validation) gets the plain ELBO
        free = self.free_bits if beta is None else 0.0
        kl_objective = kl_dims.clamp_min(free / kl_dims.numel()).sum() if free else kl
        zero = recon.new_zeros(())
        cm, imp, adv, adv_acc = zero, zero, zero, recon.new_full((), float("nan"))
        if out.get("cond_mean") is not None:
            with torch.no_grad():
                cm = self._bce(self._in_mask(out["cond_mean"]), voxels).mean()
        if out.get("imp_mu") is not None:
            n_cont = out["imp_mu"].shape[1]
            target = batch["meta"][:, :n_cont].float()
            observed = batch["meta_mask"][:, :n_cont]
            imp = self.imputation(out["imp_mu"], out["imp_logvar"], target, observed).mean()
        year_logits = out.get("year_logits")
        if year_logits is not None:
            year_bin = torch.as_tensor(batch["year_bin"], device=year_logits.device).long().view(-1)
            known = year_bin >= 0
            if known.any():
                logits_k = year_logits[known].float()
                adv = F.cross_entropy(logits_k, year_bin[known])
                adv_acc = (logits_k.argmax(1) == year_bin[known]).float().mean()
        loss = recon + (self.beta if beta is None else float(beta)) * kl_objective + self.imputation_weight * imp
        if adversary:
            loss = loss + self.adversary_weight * adv
        floor = self._entropy(voxels).mean()
        return {
            "loss": loss,
            "recon": recon,
            "floor": floor,
            "kl": kl,
            "cm": cm,
            "imp": imp,
            "adv": adv,
            "adv_acc": adv_acc,
        }
