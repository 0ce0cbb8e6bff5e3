"""The C-β-VAE loss: per-term values against hand computation, masking, missing metadata, seeding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cbvae_ext.engine.losses import CBVAELoss, LossError
from cbvae_ext.engine.step import EvalStep, TrainStep
from cbvae_ext.networks import build_network, preset_config
from cbvae_ext.schema import MetadataSchema

SHAPE = (8, 10, 8)


def _schema() -> MetadataSchema:
    return MetadataSchema.fit(
        ["a", "b", "other"], {"year": np.arange(2000, 2020.0), "sample_size": np.arange(10, 30.0)}
    )


def _batch(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    schema = _schema()
    meta = torch.randn(n, schema.meta_dim, generator=gen)
    mask = torch.ones(n, schema.mask_dim)
    mask[0, 0] = 0.0  # year missing on row 0
    return {
        "image": torch.rand(n, 1, *SHAPE, generator=gen),
        "meta": meta,
        "meta_mask": mask,
        "year_bin": torch.tensor([-1] + [i % 10 for i in range(1, n)]),
    }


def _out(n: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "recon": torch.randn(n, 1, *SHAPE, generator=gen),
        "mu": torch.randn(n, 5, generator=gen),
        "logvar": torch.randn(n, 5, generator=gen) * 0.1,
        "z": torch.randn(n, 5, generator=gen),
        "imp_mu": torch.randn(n, 4, generator=gen),
        "imp_logvar": torch.zeros(n, 4),
        "year_logits": torch.randn(n, 10, generator=gen),
    }


def test_terms_match_hand_computation():
    batch, out = _batch(), _out()
    mask = torch.zeros(SHAPE)
    mask[2:6, 2:8, 2:6] = 1
    loss = CBVAELoss(mask=mask, beta=2.0, imputation_weight=0.5, adversary_weight=0.3, prior_sigma=3.0)
    terms = loss(out, batch)

    bce = F.binary_cross_entropy_with_logits(out["recon"], batch["image"], reduction="none")
    recon = (bce * mask).flatten(1).sum(1).mean()
    kl = (0.5 * (out["mu"] ** 2 + out["logvar"].exp() - 1 - out["logvar"])).sum(1).mean()
    # imputation: observed rows -> N(target; mu, 1) NLL, the missing year on row 0 -> KL to N(0, 9)
    target, obs = batch["meta"][:, :4], batch["meta_mask"][:, :4]
    nll = 0.5 * (math.log(2 * math.pi) + (target - out["imp_mu"]) ** 2)
    prior = 0.5 * (math.log(9.0) + (1 + out["imp_mu"] ** 2) / 9.0 - 1)
    imp = torch.where(obs > 0, nll, prior).sum(1).mean()
    adv = F.cross_entropy(out["year_logits"][1:], batch["year_bin"][1:])
    acc = (out["year_logits"][1:].argmax(1) == batch["year_bin"][1:]).float().mean()

    for key, want in {"recon": recon, "kl": kl, "imp": imp, "adv": adv, "adv_acc": acc}.items():
        assert terms[key].item() == pytest.approx(want.item(), rel=1e-5), key
    assert terms["loss"].item() == pytest.approx((recon + 2 * kl + 0.5 * imp + 0.3 * adv).item(), rel=1e-5)
    # validation objective: beta 1, no adversary
    val = loss(out, batch, beta=1.0, adversary=False)
    assert val["loss"].item() == pytest.approx((recon + kl + 0.5 * imp).item(), rel=1e-5)


def test_recon_ignores_voxels_outside_the_mask_and_is_minimal_at_the_target():
    batch, out = _batch(), _out()
    mask = torch.zeros(SHAPE)
    mask[:4] = 1
    loss = CBVAELoss(mask=mask)
    before = loss(out, batch)["recon"].item()
    out["recon"][:, :, 4:] = 50.0  # garbage outside the mask changes nothing
    assert loss(out, batch)["recon"].item() == pytest.approx(before)
    logits_at_target = torch.logit(batch["image"].clamp(1e-4, 1 - 1e-4))
    for shift in (-0.5, 0.5):
        assert (
            loss.reconstruction(logits_at_target, batch["image"]).sum()
            < loss.reconstruction(logits_at_target + shift, batch["image"]).sum()
        )


def test_baseline_output_and_unknown_years():
    batch, out = _batch(), _out()
    out.update(imp_mu=None, imp_logvar=None, year_logits=None)
    terms = CBVAELoss()(out, batch)
    assert terms["imp"].item() == 0.0 and terms["adv"].item() == 0.0 and math.isnan(terms["adv_acc"].item())
    out = _out()
    batch["year_bin"][:] = -1
    terms = CBVAELoss()(out, batch)
    assert terms["adv"].item() == 0.0 and math.isnan(terms["adv_acc"].item())


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(LossError, match="prior_sigma"):
        CBVAELoss(prior_sigma=0)
    with pytest.raises(LossError, match="recon"):
        CBVAELoss()({"mu": torch.zeros(1, 2), "logvar": torch.zeros(1, 2)}, _batch())
    with pytest.raises(LossError, match="grid"):
        CBVAELoss(mask=torch.ones(4, 4, 4))(_out(), _batch())


class _Engine:
    """The attributes MONAI's trainer gives an ``iteration_update`` callable."""

    def __init__(self, network, optimizer=None, loss=None):
        self.network, self.optimizer, self.loss_function = network, optimizer, loss or CBVAELoss()
        self.state = type("S", (), {"device": torch.device("cpu"), "iteration": 1})()


def _two_steps(seed: int) -> list[dict[str, float]]:
    from monai.utils import set_determinism

    set_determinism(seed)
    net = build_network(preset_config("cpu", _schema(), SHAPE, channels=[4, 8], block_layers=[1], growth_rate=4))
    engine = _Engine(net, torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.995)))
    net.grl.lambda_ = 0.25
    step = TrainStep(grad_clip=1.0)
    return [step(engine, _batch(seed=i)) for i in range(2)]


def test_train_step_is_deterministic_and_reports_every_term():
    a, b = _two_steps(7), _two_steps(7)
    assert a == b  # exactly equal on CPU with the same seed
    assert set(a[0]) == {"loss", "recon", "kl", "imp", "adv", "adv_acc", "grad_norm", "beta", "grl_lambda", "lr"}
    assert a[0]["grl_lambda"] == 0.25 and a[0]["beta"] == 1.0
    assert a[1]["loss"] != a[0]["loss"]
    c = _two_steps(8)
    assert c[0]["loss"] != a[0]["loss"]


def test_eval_step_uses_beta_one_and_no_grad():
    net = build_network(preset_config("cpu", _schema(), SHAPE, channels=[4, 8], block_layers=[1], growth_rate=4))
    engine = _Engine(net)
    out = EvalStep(loss=CBVAELoss(beta=5.0, adversary_weight=1.0))(engine, _batch())
    assert out["loss"] == pytest.approx(out["recon"] + out["kl"] + out["imp"], rel=1e-5)
    assert not net.training
