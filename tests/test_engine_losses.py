"""The C-β-VAE loss: per-term values against hand computation, entropy floor, conditional-mean term, masking,
missing metadata, seeding; the KL controller's ratio scale."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events

from cbvae_ext.engine import KLController, MeanTerms
from cbvae_ext.engine.kl_controller import kl_ratio
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

    x = batch["image"]
    floor = (-(x * x.log() + (1 - x) * (1 - x).log()) * mask).flatten(1).sum(1).mean()

    for key, want in {"recon": recon, "kl": kl, "imp": imp, "adv": adv, "adv_acc": acc, "floor": floor}.items():
        assert terms[key].item() == pytest.approx(want.item(), rel=1e-5), key
    assert terms["cm"].item() == 0.0  # no conditional-mean path in this output
    assert terms["loss"].item() == pytest.approx((recon + 2 * kl + 0.5 * imp + 0.3 * adv).item(), rel=1e-5)
    # validation objective: beta 1, no adversary
    val = loss(out, batch, beta=1.0, adversary=False)
    assert val["loss"].item() == pytest.approx((recon + kl + 0.5 * imp).item(), rel=1e-5)


def test_conditional_mean_term_is_reported_not_optimised():
    batch, out = _batch(), _out()
    out["cond_mean"] = torch.randn_like(out["recon"], requires_grad=True)
    loss = CBVAELoss(beta=1.0, imputation_weight=0.0, adversary_weight=0.0)
    terms = loss(out, batch)
    cm = F.binary_cross_entropy_with_logits(out["cond_mean"], batch["image"], reduction="none").flatten(1).sum(1).mean()
    assert terms["cm"].item() == pytest.approx(cm.item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx((terms["recon"] + terms["kl"]).item(), rel=1e-5)
    assert not terms["cm"].requires_grad


def test_free_bits_charge_only_kl_above_the_allowance():
    batch, out = _batch(), _out()
    plain = CBVAELoss(imputation_weight=0.0, adversary_weight=0.0)
    free = CBVAELoss(imputation_weight=0.0, adversary_weight=0.0, free_bits=5.0)  # 1 nat for each of 5 dims
    kl_dims = CBVAELoss.kl(out["mu"], out["logvar"], per_dim=True).mean(0)
    terms = free(out, batch)
    assert terms["kl"].item() == pytest.approx(kl_dims.sum().item(), rel=1e-6)  # reported: the true KL
    want = terms["recon"] + kl_dims.clamp_min(1.0).sum()
    assert terms["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    assert free(out, batch, beta=1.0)["loss"].item() == pytest.approx(plain(out, batch)["loss"].item())  # validation


def test_floor_is_the_minimum_of_the_reconstruction():
    batch = _batch()
    x = batch["image"].clamp(1e-3, 1 - 1e-3)
    loss = CBVAELoss()
    at_target = loss.reconstruction(torch.logit(x), x)
    torch.testing.assert_close(at_target, loss.floor(x), rtol=1e-5, atol=1e-3)
    assert (loss.reconstruction(torch.logit(x) + 0.3, x) > loss.floor(x)).all()
    # hard 0/1 targets have no entropy: the floor is 0
    assert loss.floor(torch.tensor([[0.0, 1.0, 0.0]])).item() == 0.0


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
    assert set(a[0]) == {
        *("loss", "recon", "floor", "kl", "cm", "imp", "adv", "adv_acc"),
        *("grad_norm", "beta", "grl_lambda", "lr"),
    }
    assert a[0]["grl_lambda"] == 0.25 and a[0]["beta"] == 1.0
    assert a[1]["loss"] != a[0]["loss"]
    c = _two_steps(8)
    assert c[0]["loss"] != a[0]["loss"]


def test_eval_step_uses_beta_one_and_no_grad():
    net = build_network(preset_config("cpu", _schema(), SHAPE, channels=[4, 8], block_layers=[1], growth_rate=4))
    engine = _Engine(net)
    out = EvalStep(loss=CBVAELoss(beta=5.0, adversary_weight=1.0))(engine, _batch())
    assert out["loss"] == pytest.approx(out["recon"] + out["kl"] + out["imp"], rel=1e-5)
    assert out["cm"] > out["floor"] > 0  # the conditional-mean path's own likelihood, above the floor
    assert not net.training
    # the validation ELBO draws z from the posterior (issue 11: it was taken at z = mu): reproducible under a
    # seed, different from the z = mu value
    torch.manual_seed(1)
    again = EvalStep(loss=CBVAELoss(beta=5.0, adversary_weight=1.0))(engine, _batch())
    torch.manual_seed(1)
    assert EvalStep(loss=CBVAELoss(beta=5.0, adversary_weight=1.0))(engine, _batch())["recon"] == again["recon"]
    with torch.no_grad():
        at_mu = CBVAELoss()(net(_batch()["image"], _batch()["meta"], _batch()["meta_mask"]), _batch())
    assert float(at_mu["recon"]) != pytest.approx(again["recon"], rel=1e-6)


# ---- KL controller: the scale of its ratio --------------------------------------------------------------


def test_kl_ratio_scales():
    # a 1k-split epoch: recon 1900 nats/map, entropy floor 941, KL 60, loss 1965
    assert kl_ratio(60.0, 1900.0, 941.0, 1965.0, "excess") == pytest.approx(60.0 / (959.0 + 60.0))
    assert kl_ratio(60.0, 1900.0, 941.0, 1965.0, "total") == pytest.approx(60.0 / 1965.0)
    assert kl_ratio(1.0, 941.0, 941.0, 942.0, "excess") == 1.0  # at the floor, KL is all that is left
    with pytest.raises(ValueError, match="scale"):
        KLController(CBVAELoss(), scale="voxel")


def _epochs(kl: float, recon: float, floor: float, controller: KLController, n: int) -> list[float]:
    engine = Engine(lambda e, _: {"loss": recon + kl, "recon": recon, "floor": floor, "kl": kl})
    MeanTerms(keys=("loss", "recon", "floor", "kl"), prefix="train_").attach(engine, "terms")
    controller.attach(engine)
    betas: list[float] = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: betas.append(controller.loss.beta))
    engine.run([0], max_epochs=n)
    return betas


def test_kl_controller_reads_the_share_above_the_floor(caplog):
    """With KL 6% of the excess NLL the latent is in use: the total-loss scale (3%) raises β anyway."""
    excess = KLController(CBVAELoss(beta=1.0), threshold=0.05, patience=3, factor=2.0, cap=8.0)
    assert _epochs(60.0, 1900.0, 941.0, excess, 6) == [1.0] * 6
    assert excess.ratios[0] == pytest.approx(60.0 / 1019.0)
    total = KLController(CBVAELoss(beta=1.0), threshold=0.05, patience=3, factor=2.0, cap=8.0, scale="total")
    with caplog.at_level("INFO"):
        assert _epochs(60.0, 1900.0, 941.0, total, 6) == [1.0, 1.0, 2.0, 2.0, 2.0, 4.0]
    assert "beta 1 -> 2" in caplog.text  # logged through engine.logger
    # a collapsing latent (KL 2% of the excess) raises β on the excess scale too; disabled keeps it
    assert _epochs(20.0, 1900.0, 941.0, KLController(CBVAELoss(), patience=3, factor=2.0), 3)[-1] == 2.0
    off = KLController(CBVAELoss(), patience=3, factor=2.0, enabled=False)
    assert _epochs(20.0, 1900.0, 941.0, off, 3) == [1.0] * 3 and len(off.ratios) == 3
