"""Networks: FiLM, gradient reversal, imputation masking, receptive field, baseline, sizes of both presets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cbvae_ext.data import CATEGORIES
from cbvae_ext.networks import (
    DilatedDenseBlock,
    FiLMGenerator,
    build_network,
    count_parameters,
    encoder_shapes,
    grad_reverse,
    preset_config,
)
from cbvae_ext.schema import MetadataSchema

SHAPE = [21, 26, 21]  # odd sizes exercise the padding/cropping path; small for speed


@pytest.fixture(scope="module")
def schema() -> MetadataSchema:
    rng = np.random.default_rng(0)
    values = {"year": rng.uniform(1995, 2015, 200), "sample_size": rng.integers(8, 60, 200).astype(float)}
    return MetadataSchema.fit(CATEGORIES, values)


def _batch(schema: MetadataSchema, n: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, *SHAPE, generator=g)
    meta = torch.zeros(n, schema.meta_dim)
    meta[:, :2] = torch.randn(n, 2, generator=g)
    meta[:, schema.n_continuous + torch.arange(n)] = 1.0
    mask = torch.zeros(n, schema.mask_dim)
    mask[:, [0, 1, schema.n_continuous]] = 1.0
    return x, meta, mask


def _model(schema: MetadataSchema, model: str = "cbvae", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_network(preset_config("cpu", schema, SHAPE, model))


def _randomise_film(net: torch.nn.Module) -> None:
    """Move FiLM generators off their identity initialisation, as training would."""
    for module in net.modules():
        if isinstance(module, FiLMGenerator):
            torch.nn.init.normal_(module.mlp[-1].weight, std=0.5)


@pytest.mark.parametrize("model", ["cbvae", "baseline"])
def test_forward_contract(schema: MetadataSchema, model: str) -> None:
    net = _model(schema, model)
    x, meta, mask = _batch(schema)
    out = net(x, meta, mask)
    assert out["recon"].shape == (3, 1, *SHAPE)
    assert out["mu"].shape == out["logvar"].shape == out["z"].shape == (3, 32)
    assert not torch.equal(out["z"], out["mu"])  # sampled in training mode
    if model == "cbvae":
        assert out["imp_mu"].shape == out["imp_logvar"].shape == (3, schema.n_continuous)
        assert out["year_logits"].shape == (3, 10)
    else:
        assert out["imp_mu"] is out["imp_logvar"] is out["year_logits"] is None
    net.eval()
    with torch.no_grad():
        out = net(x, meta, mask)
    assert torch.equal(out["z"], out["mu"])
    m = net.decoder_input(meta, mask, out["imp_mu"])
    assert torch.equal(net.decode(out["z"], m), out["recon"])


def test_film_generator_starts_at_identity() -> None:
    gen = FiLMGenerator(5, [3, 4], hidden=8)
    params = gen(torch.randn(2, 5))
    assert [p[0].shape for p in params] == [(2, 3), (2, 4)]
    for gamma, beta in params:
        assert torch.equal(gamma, torch.ones_like(gamma)) and torch.equal(beta, torch.zeros_like(beta))


def test_film_conditions_encoder_and_decoder(schema: MetadataSchema) -> None:
    net = _model(schema).eval()
    x, meta, mask = _batch(schema)
    z = torch.randn(3, 32)
    m1 = net.decoder_input(meta, mask, None)
    m2 = m1.clone()
    m2[:, 0] += 2.0  # another year
    with torch.no_grad():
        # identity at init: the conditioning has no effect yet
        assert torch.equal(net.decode(z, m1), net.decode(z, m2))
        _randomise_film(net)
        assert (net.decode(z, m1) - net.decode(z, m2)).abs().max() > 1e-3
        meta2 = meta.clone()
        meta2[:, 0] += 2.0
        assert (net.encode(x, meta, mask)[0] - net.encode(x, meta2, mask)[0]).abs().max() > 1e-4


def test_baseline_has_no_conditioning(schema: MetadataSchema) -> None:
    net = _model(schema, "baseline").eval()
    _randomise_film(net)
    assert not any(isinstance(m, FiLMGenerator) for m in net.modules())
    x, meta, mask = _batch(schema)
    z = torch.randn(3, 32)
    with torch.no_grad():
        m = net.decoder_input(meta, mask, None)
        assert torch.equal(net.decode(z, m), net.decode(z, torch.randn_like(m)))
        assert torch.equal(net(x, meta, mask)["mu"], net(x, torch.randn_like(meta), 1 - mask)["mu"])


def test_gradient_reversal_numbers(schema: MetadataSchema) -> None:
    x = torch.randn(4, 6, requires_grad=True)
    w = torch.randn(4, 6)
    y = grad_reverse(x, 0.7)
    assert torch.equal(y, x)
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, -0.7 * w)

    net = _model(schema)
    net.grl.lambda_ = 0.25  # what a scheduling handler sets
    z = torch.randn(3, 32, requires_grad=True)
    net.adversary(net.grl(z)).square().sum().backward()
    z_plain = z.detach().clone().requires_grad_(True)
    net.adversary(z_plain).square().sum().backward()
    torch.testing.assert_close(z.grad, -0.25 * z_plain.grad)


def test_decoder_input_uses_observed_else_imputed(schema: MetadataSchema) -> None:
    net = _model(schema)
    _, meta, mask = _batch(schema)
    imp_mu = torch.full((3, schema.n_continuous), 9.0, requires_grad=True)
    m = net.decoder_input(meta, mask, imp_mu)
    c = schema.n_continuous
    assert m.shape == (3, schema.meta_dim + schema.mask_dim)
    torch.testing.assert_close(m[:, :2], meta[:, :2])  # year, sample size observed
    assert torch.equal(m[:, 2:c], torch.full((3, c - 2), 9.0))  # field strength, FWHM missing -> imputed
    assert torch.equal(m[:, c : schema.meta_dim], meta[:, c:])  # one-hot untouched
    assert torch.equal(m[:, schema.meta_dim :], mask)
    assert not m.requires_grad  # imputation learns from its own loss only
    assert torch.equal(net.decoder_input(meta, mask, None)[:, :c], meta[:, :c])


def test_dilated_block_sees_whole_bottleneck() -> None:
    grid = encoder_shapes([48, 56, 48], 2)[-1]
    assert grid == (6, 7, 6)
    block = DilatedDenseBlock(3, 8, 4, [1, 2, 4], 8, grid, "batch", "leakyrelu").eval()
    x = torch.randn(1, 8, *grid, requires_grad=True)
    block(x)[:, :, 0, 0, 0].sum().backward()
    assert (x.grad.abs().sum(1) > 0).all()  # the corner voxel depends on every voxel
    block = DilatedDenseBlock(3, 8, 4, [1, 1, 1, 1, 1, 1], 8, grid, "batch", "leakyrelu").eval()
    x = torch.randn(1, 8, *grid, requires_grad=True)
    block(x)[:, :, 0, 0, 0].sum().backward()
    assert (x.grad.abs().sum(1) > 0).all()
    with pytest.raises(ValueError, match="receptive field"):
        DilatedDenseBlock(3, 8, 4, [1, 1], 8, grid, "batch", "leakyrelu")
    # undilated 3x3 layers too few to span the grid leave the far corner unseen (what the guard prevents)
    plain = torch.nn.Sequential(*[torch.nn.Conv3d(8, 8, 3, padding=1) for _ in range(2)])
    x = torch.randn(1, 8, *grid, requires_grad=True)
    plain(x)[:, :, 0, 0, 0].sum().backward()
    assert x.grad[0, :, -1, -1, -1].abs().sum() == 0


# exact sizes at the 4 mm grid with the data builder's 15 categories, documented in bundle/docs/architecture.md
PARAMETERS = {
    ("cpu", "cbvae"): 508_778,
    ("cpu", "baseline"): 549_728,
    ("gpu", "cbvae"): 1_522_138,
    ("gpu", "baseline"): 4_983_272,
}


@pytest.mark.parametrize(("preset", "model"), list(PARAMETERS))
def test_parameter_counts(schema: MetadataSchema, preset: str, model: str) -> None:
    config = preset_config(preset, schema, [48, 56, 48], model)
    assert count_parameters(build_network(config)) == PARAMETERS[(preset, model)]


def test_config_is_json_and_validated(schema: MetadataSchema) -> None:
    config = preset_config("cpu", schema, SHAPE, latent_size=16)
    again = json.loads(json.dumps(config))
    assert again == config and config["latent_size"] == 16 and config["dilations"] == [1, 2]
    net = build_network({**again, "manifest_sha256": "abc", "grid": {"shape": SHAPE}})  # extra keys ignored
    assert net.latent_size == 16
    with pytest.raises(ValueError, match="unknown model 'vae'; valid models: cbvae, baseline"):
        build_network({**config, "model": "vae"})
    with pytest.raises(ValueError, match="lacks channels"):
        build_network({k: v for k, v in config.items() if k != "channels"})
    with pytest.raises(ValueError, match="unknown network preset 'tpu'"):
        preset_config("tpu", schema, SHAPE)
