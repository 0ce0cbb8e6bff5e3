"""Networks: FiLM, conditioning path (conditional mean, unknown tokens, condition dropout), gradient reversal,
imputation masking, receptive field, baseline, twins, sizes of both presets."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from cbvae_ext.data import CATEGORIES
from cbvae_ext.networks import (
    ConditionalMean,
    DilatedDenseBlock,
    FiLMGenerator,
    build_network,
    count_parameters,
    drop_conditions,
    encoder_shapes,
    grad_reverse,
    groups_config,
    hide_groups,
    preset_config,
)
from cbvae_ext.networks.conditioning import fit_ridge, logit
from cbvae_ext.networks.dense3d import set_fast_path
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


def _model(schema: MetadataSchema, model: str = "cbvae", seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_network(preset_config("cpu", schema, SHAPE, model, **overrides))


def _randomise_film(net: torch.nn.Module) -> None:
    """Move FiLM generators, the decoder's output layer and the unknown tokens off their initialisation."""
    for module in net.modules():
        if isinstance(module, FiLMGenerator):
            torch.nn.init.normal_(module.mlp[-1].weight, std=0.5)
    decoder = getattr(net, "decoder", None)
    if decoder is not None:
        torch.nn.init.normal_(decoder.head.pixelshuffle.conv_block.conv.weight, std=0.5)
    if getattr(net, "tokens", None) is not None:
        torch.nn.init.normal_(net.tokens.token)


def _category_means(schema: MetadataSchema, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    cat_means = rng.uniform(0.01, 0.5, (schema.n_categories, *SHAPE)).astype(np.float32)
    return cat_means.mean(0), cat_means


def _fit(net: torch.nn.Module, schema: MetadataSchema) -> np.ndarray:
    """Initialise the conditional-mean path as ``initialise_from_data`` does; returns the category means."""
    mean, cat_means = _category_means(schema)
    coef = np.zeros((schema.meta_dim + schema.mask_dim, *SHAPE), np.float32)
    coef[schema.group("task").meta_slice] = cat_means - mean
    net.cond_mean.fit(mean, coef)
    return cat_means


def _task_condition(schema: MetadataSchema, n: int, task: int | None) -> torch.Tensor:
    """Decoder input with only the task given (``None``: nothing given)."""
    meta, mask = torch.zeros(n, schema.meta_dim), torch.zeros(n, schema.mask_dim)
    group = schema.group("task")
    if task is not None:
        meta[:, group.meta_slice.start + task] = 1.0
        mask[:, group.mask_index] = 1.0
    return torch.cat([meta, mask], dim=1)


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
    net = _model(schema, decoder_cond_input=False, cond_mean=False).eval()
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
        # with the conditions also in the decoder's first layer they act from the start
        both = _model(schema, decoder_cond_input=True, cond_mean=False).eval()
        assert (both.decode(z, m1) - both.decode(z, m2)).abs().max() > 1e-4


@pytest.mark.parametrize(("model", "overrides"), [("baseline", {}), ("cbvae", {"conditioning": False})])
def test_unconditional_models_ignore_conditions(schema: MetadataSchema, model: str, overrides: dict) -> None:
    """The baseline and the conditioning-off twin: no FiLM, outputs independent of the metadata."""
    net = _model(schema, model, **overrides).eval()
    _randomise_film(net)
    assert not any(isinstance(m, FiLMGenerator) for m in net.modules())
    x, meta, mask = _batch(schema)
    z = torch.randn(3, 32)
    with torch.no_grad():
        m = net.decoder_input(meta, mask, None)
        assert torch.equal(net.decode(z, m), net.decode(z, torch.randn_like(m)))
        assert torch.equal(net(x, meta, mask)["mu"], net(x, torch.randn_like(meta), 1 - mask)["mu"])


@pytest.mark.parametrize(("model", "overrides"), [("baseline", {}), ("cbvae", {"conditioning": False})])
def test_unconditional_models_add_the_mean_map_logits(schema: MetadataSchema, model: str, overrides: dict) -> None:
    """Output bias = logit of the training mean map: training starts near the mean-map model, not below it."""
    net = _model(schema, model, **overrides).eval()
    z, m = torch.randn(2, 32), torch.zeros(2, schema.meta_dim + schema.mask_dim)
    with torch.no_grad():
        before = net.decode(z, m)
        mean, _ = _category_means(schema)
        net.cond_mean.fit(mean)
        torch.testing.assert_close(net.decode(z, m) - before, logit(mean).float().expand(2, 1, *SHAPE))


def test_conditional_mean_starts_at_the_category_mean_logits(schema: MetadataSchema) -> None:
    net = _model(schema).eval()
    cat_means = _fit(net, schema)
    k = schema.n_categories
    with torch.no_grad():
        m = torch.cat([_task_condition(schema, 1, task) for task in range(k)])
        want = logit(cat_means).float()[:, None]
        torch.testing.assert_close(net.conditional_mean(m), want, atol=2e-4, rtol=1e-4)
        # task unknown (token at 0): the overall mean
        torch.testing.assert_close(
            net.conditional_mean(_task_condition(schema, 1, None))[0, 0], logit(cat_means.mean(0)).float()
        )
    # below the number of categories: the best low-rank fit, no longer exact
    low = ConditionalMean(schema.meta_dim + schema.mask_dim, SHAPE, rank=3)
    mean, cat_means = _category_means(schema)
    coef = np.zeros((schema.meta_dim + schema.mask_dim, *SHAPE), np.float32)
    coef[schema.group("task").meta_slice] = cat_means - mean
    low.fit(mean, coef)
    with torch.no_grad():
        err = (low(_task_condition(schema, 1, 0)) - logit(cat_means[:1]).float()).abs().max()
    assert err > 0.1


def test_ridge_fit_recovers_category_means_and_picks_the_penalty_on_validation() -> None:
    rng = np.random.default_rng(0)
    k, v = 4, 30
    means = rng.uniform(0, 1, (k, v))
    cats = rng.integers(0, k, 400)
    x = np.eye(k)[cats]
    y = means[cats] + rng.normal(0, 0.3, (400, v))
    b0, coef, best, _ = fit_ridge(
        x[:300], lambda r: y[:300][r], [x[300:]], lambda r: y[300:][r], [np.zeros(k)], voxel_step=1
    )
    empirical = np.stack([y[:300][cats[:300] == j].mean(0) for j in range(k)])
    np.testing.assert_allclose(b0 + np.eye(k) @ coef, empirical, atol=1e-5)  # no penalty: the category means
    # pure-noise features: validation prefers the largest penalty (predicting the mean)
    noise = rng.normal(size=(400, 20))
    _, coef, best, scores = fit_ridge(
        noise[:300], lambda r: y[:300][r], [noise[300:]], lambda r: y[300:][r], [np.full(20, 0.1), np.full(20, 1e4)]
    )
    assert best == 1 and scores[1] < scores[0] and np.abs(coef).max() < 0.01


def test_decode_of_the_prior_differs_between_categories(schema: MetadataSchema) -> None:
    net = _model(schema).eval()
    _fit(net, schema)
    _randomise_film(net)
    z = torch.zeros(schema.n_categories, 32)
    with torch.no_grad():
        maps = torch.sigmoid(net.decode(z, torch.cat([_task_condition(schema, 1, t) for t in range(len(z))])))
    flat = maps.flatten(1)
    corr = torch.corrcoef(flat)
    assert (flat.std(0).mean() > 0.05) and (corr[~torch.eye(len(z), dtype=torch.bool)] < 0.99).all()
    # without conditioning (the twin) every category decodes to the same map
    twin = _model(schema, conditioning=False).eval()
    _randomise_film(twin)
    with torch.no_grad():
        maps = twin.decode(z, torch.cat([_task_condition(schema, 1, t) for t in range(len(z))]))
    assert torch.equal(maps, maps[:1].expand_as(maps))


def test_unknown_token_makes_output_independent_of_a_hidden_group(schema: MetadataSchema) -> None:
    net = _model(schema).eval()
    _fit(net, schema)
    _randomise_film(net)
    z = torch.randn(4, 32)
    c = schema.n_continuous
    with torch.no_grad():
        given = torch.cat([_task_condition(schema, 1, t) for t in (0, 1, 2, 3)])
        given[:, 0] = 0.7  # a year, observed
        given[:, schema.meta_dim] = 1.0
        hidden = given.clone()
        hidden[:, schema.meta_dim + c] = 0.0  # task mask 0, one-hot left in place
        out_given, out_hidden = net.decode(z[:1].expand(4, -1), given), net.decode(z[:1].expand(4, -1), hidden)
        assert (out_given[0] - out_given[1]).abs().max() > 1e-2  # the task matters when given
        torch.testing.assert_close(out_hidden, out_hidden[:1].expand_as(out_hidden), atol=0, rtol=0)
        zeroed = hidden.clone()
        zeroed[:, c : schema.meta_dim] = 0.0  # what the data loader stores for a missing task
        assert torch.equal(net.decode(z, hidden), net.decode(z, zeroed))
        # a hidden continuous field keeps its (imputed) value: the year still acts
        year = hidden.clone()
        year[:, schema.meta_dim] = 0.0
        year2 = year.clone()
        year2[:, 0] = -1.5
        assert (net.decode(z, year) - net.decode(z, year2)).abs().max() > 1e-3


def test_topics_are_one_more_condition_group() -> None:
    """With the LDA topic vector in the schema: its own group, scaled to O(1) entries, hidden behind its token."""
    rng = np.random.default_rng(0)
    topics = MetadataSchema.fit(
        CATEGORIES, {"year": rng.uniform(1995, 2015, 50)}, topic_names=[f"t{i}" for i in range(6)]
    )
    groups = groups_config(topics)
    assert [g[:2] for g in groups][4:] == [["topics", "vector"], ["task", "categorical"]]
    net = _model(topics).eval()
    _randomise_film(net)
    group = topics.group("topics")
    assert (
        torch.allclose(net.cond_scale[group.meta_slice], torch.tensor(6.0).sqrt())
        and net.cond_scale[: group.meta_slice.start].eq(1).all()
    )
    m = torch.zeros(2, topics.meta_dim + topics.mask_dim)
    m[:, group.meta_slice] = torch.from_numpy(rng.dirichlet(np.ones(6), 2)).float()
    m[:, topics.meta_dim + group.mask_index] = 1.0
    z = torch.zeros(2, 32)
    with torch.no_grad():
        assert (net.decode(z, m)[0] - net.decode(z, m)[1]).abs().max() > 1e-3  # the mixture matters
        m[:, topics.meta_dim + group.mask_index] = 0.0
        out = net.decode(z, m)
        assert torch.equal(out[0], out[1])  # hidden: only the token is seen


def test_condition_dropout_hides_exactly_the_chosen_groups(schema: MetadataSchema) -> None:
    groups = schema.groups
    assert [g[0] for g in groups_config(schema)] == [g.name for g in groups]
    assert [g.name for g in groups] == ["year", "sample_size", "field_strength", "fwhm", "task"]
    _, meta, mask = _batch(schema, n=3)
    hidden = torch.tensor([[True, False, False, False, False], [False] * 5, [False, True, False, False, True]])
    m2, k2 = hide_groups(meta, mask, groups, hidden)
    c = schema.n_continuous
    assert (
        m2[0, 0] == 0 and k2[0, 0] == 0 and torch.equal(m2[0, 1:], meta[0, 1:]) and torch.equal(k2[0, 1:], mask[0, 1:])
    )
    assert torch.equal(m2[1], meta[1]) and torch.equal(k2[1], mask[1])
    assert (m2[2, [1, *range(c, schema.meta_dim)]] == 0).all() and (k2[2, [1, c]] == 0).all()
    assert torch.equal(m2[2, [0, 2, 3]], meta[2, [0, 2, 3]]) and k2[2, 0] == 1
    # random: each group hidden with its own probability, values and mask together
    n = 4000
    meta = torch.rand(n, schema.meta_dim) + 0.1
    mask = torch.ones(n, schema.mask_dim)
    m3, k3 = drop_conditions(meta, mask, groups, {"task": 0.5, "year": 0.2}, generator=torch.Generator().manual_seed(0))
    assert abs((k3[:, c] == 0).float().mean() - 0.5) < 0.03 and abs((k3[:, 0] == 0).float().mean() - 0.2) < 0.03
    assert (k3[:, 1:c] == 1).all()
    assert torch.equal((m3[:, c:] == 0).all(1), k3[:, c] == 0) and torch.equal(m3[:, 0] == 0, k3[:, 0] == 0)


def test_training_forward_drops_conditions(schema: MetadataSchema) -> None:
    """With dropout 1 the training forward sees no condition: the encoder's output ignores the metadata."""
    net = _model(schema, condition_dropout=1.0)
    _randomise_film(net)
    x, meta, mask = _batch(schema)
    torch.manual_seed(1)
    a = net(x, meta, mask)
    torch.manual_seed(1)
    b = net(x, torch.randn_like(meta), mask)
    torch.testing.assert_close(a["mu"], b["mu"])
    net.eval()
    assert not torch.equal(net(x, meta, mask)["mu"], net(x, torch.randn_like(meta), mask)["mu"])


def test_encoder_groups_hide_the_task_from_the_encoder(schema: MetadataSchema) -> None:
    net = _model(schema, encoder_groups=["year", "sample_size", "field_strength", "fwhm"]).eval()
    _randomise_film(net)
    x, meta, mask = _batch(schema)
    other = meta.clone()
    other[:, schema.n_continuous :] = torch.roll(meta[:, schema.n_continuous :], 1, dims=1)
    with torch.no_grad():
        assert torch.equal(net.encode(x, meta, mask)[0], net.encode(x, other, mask)[0])
        year = meta.clone()
        year[:, 0] += 1.0
        assert not torch.equal(net.encode(x, meta, mask)[0], net.encode(x, year, mask)[0])


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


@pytest.mark.parametrize("source", ["z", "mu"])
def test_adversary_reads_its_input_and_reverses_into_the_encoder(schema: MetadataSchema, source: str) -> None:
    net = _model(schema, adversary_input=source).train()
    x, meta, mask = _batch(schema)
    grads = {}
    for lam in (0.5, -1.0):  # -1: the adversary's plain gradient; the same seed, so the same z and dropout
        net.zero_grad()
        net.grl.lambda_ = lam
        torch.manual_seed(1)
        out = net(x, meta, mask)
        assert not torch.equal(out["z"], out["mu"])  # training samples z
        torch.testing.assert_close(out["year_logits"], net.adversary(out[source]))
        out["year_logits"].logsumexp(1).sum().backward()
        grads[lam] = next(net.encoder.parameters()).grad.clone()
    # the adversary's loss reaches the encoder reversed and scaled by lambda, whichever input it reads
    assert grads[-1.0].abs().sum() > 0
    torch.testing.assert_close(grads[0.5], -0.5 * grads[-1.0])


def test_adversary_input_is_checked(schema: MetadataSchema) -> None:
    with pytest.raises(ValueError, match=r"adversary_input must be one of \('z', 'mu'\), got 'sigma'"):
        _model(schema, adversary_input="sigma")


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


# exact trainable sizes at the 4 mm grid with 15 categories and no topics (the conditional mean is buffers),
# documented in bundle/docs/architecture.md
PARAMETERS = {
    ("cpu", "cbvae"): 506_621,
    ("cpu", "baseline"): 549_728,
    ("gpu", "cbvae"): 1_517_997,
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


def test_exported_conditional_mean_and_task_contrast(schema: MetadataSchema, tmp_path) -> None:
    """``conditional_mean.ts`` and ``CounterfactualModel.conditional_mean`` / ``contrast`` from an exported run."""
    import nibabel as nib

    from cbvae_ext.export import export_decoder
    from cbvae_ext.inference import load

    net = _model(schema).eval()
    cat_means = _fit(net, schema)
    _randomise_film(net)
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:-2, 2:-2, 2:-2] = 1
    nib.save(nib.Nifti1Image(mask, affine), tmp_path / "mask.nii.gz")
    run = tmp_path / "run"
    export_decoder(net, schema, SHAPE, affine, tmp_path / "mask.nii.gz", run)
    assert (run / "conditional_mean.ts").is_file()
    model = load(run)
    k = schema.categories.index("emotion")
    got = model.conditional_mean({"task": "emotion"}).map
    np.testing.assert_allclose(got, np.where(mask > 0, cat_means[k], 0.0), atol=1e-5)
    z = np.random.default_rng(0).normal(size=32).astype(np.float32)
    contrast = model.contrast(z, {"task": "emotion", "year": 2005}, hidden=("task",), strength=2.0)
    given, unknown = model.decode(z, {"task": "emotion", "year": 2005}).map, model.decode(z, {"year": 2005}).map
    np.testing.assert_allclose(contrast, 2.0 * (given - unknown), atol=1e-6)
    assert np.abs(contrast).max() > 1e-3
    assert not np.any(model.contrast(z, {"year": 2005}, hidden=("task",)))  # nothing hidden, nothing added


def test_decoder_groups_leave_the_task_to_the_conditional_mean_path(schema: MetadataSchema) -> None:
    """With the task outside ``decoder_groups``, switching it moves the logits by the path's change exactly."""
    net = _model(schema, cond_mean=True, decoder_groups=["year", "sample_size", "field_strength", "fwhm", "topics"])
    net.eval()
    _randomise_film(net)
    task = schema.group("task")
    with torch.no_grad():
        net.cond_mean.weight.normal_()
        net.cond_mean.basis.normal_(std=0.01)
    _, meta, mask = _batch(schema)
    meta[:, task.meta_slice] = 0.0
    meta[torch.arange(len(meta)), task.meta_slice.start + torch.arange(len(meta))] = 1.0
    mask[:, task.mask_index] = 1.0
    other = meta.clone()
    other[:, task.meta_slice] = torch.roll(meta[:, task.meta_slice], 1, dims=1)
    m, m_other = torch.cat([meta, mask], 1), torch.cat([other, mask], 1)
    z = torch.randn(len(meta), net.latent_size)
    with torch.no_grad():
        change = net.decode(z, m_other) - net.decode(z, m)
        path_change = net.conditional_mean(m_other) - net.conditional_mean(m)
        torch.testing.assert_close(change, path_change, rtol=1e-4, atol=1e-4)
        assert change.abs().max() > 0
        # with every group given to the decoder, its FiLM adds its own change on top of the path's
        net.decoder_keep.fill_(1.0)
        assert not torch.allclose(net.decode(z, m_other) - net.decode(z, m), path_change, atol=1e-4)


@pytest.mark.parametrize(("n_inputs", "true_rank"), [(60, 60), (60, 5)])
def test_conditional_mean_fit_is_the_best_low_rank_approximation(n_inputs: int, true_rank: int) -> None:
    """``ConditionalMean.fit`` (eigendecomposition of the small Gram matrix) stores numpy's truncated SVD of the
    coefficients, orthonormal basis rows; a coefficient matrix of lower rank than the path is kept exactly."""
    rng = np.random.default_rng(3)
    grid = (9, 10, 8)
    coef = rng.normal(size=(n_inputs, true_rank)) @ rng.normal(size=(true_rank, int(np.prod(grid)))) * 0.01
    path = ConditionalMean(n_inputs, grid, rank=8)
    path.fit(np.full(grid, 0.2), coef.reshape(n_inputs, *grid))
    a, s, vh = np.linalg.svd(coef, full_matrices=False)
    best = (a[:, :8] * s[:8]) @ vh[:8]
    stored = (path.weight.T @ path.basis).double().numpy()
    assert np.abs(stored - best).max() <= 1e-5 * np.abs(coef).max()
    kept = min(8, true_rank)
    gram = (path.basis[:kept] @ path.basis[:kept].T).double()
    torch.testing.assert_close(gram, torch.eye(kept, dtype=torch.float64), atol=1e-5, rtol=0)
    assert not path.basis[kept:].any()  # no directions made of rounding noise
    if true_rank <= 8:
        assert np.abs(stored - coef).max() <= 1e-5 * np.abs(coef).max()


def test_conditional_mean_keeps_its_exact_entries_outside_the_rank() -> None:
    """``exact`` rows of the coefficients are stored as given (fast and plain path alike), the rest at the rank."""
    rng = np.random.default_rng(4)
    grid, n_inputs, exact = (5, 6, 4), 12, [3, 7]
    coef = rng.normal(size=(n_inputs, int(np.prod(grid)))) * 0.01
    path = ConditionalMean(n_inputs, grid, rank=2, exact=exact)
    path.fit(np.full(grid, 0.3), coef.reshape(n_inputs, *grid))
    m = torch.zeros(2, n_inputs, dtype=torch.float64)
    m[0, 3], m[1, 7] = 1.5, -2.0  # only exact entries: the prediction is exact
    with torch.no_grad():
        fast = path(m.float())
        plain = set_fast_path(copy.deepcopy(path), False)(m.float())
    want = logit(0.3 + (m[:, exact] @ torch.from_numpy(coef[exact])).numpy()).float().reshape(2, 1, *grid)
    torch.testing.assert_close(fast, want, rtol=0, atol=1e-4)
    torch.testing.assert_close(plain, fast, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="exact indices"):
        ConditionalMean(n_inputs, grid, rank=2, exact=[n_inputs])
    torch.testing.assert_close(path.exact_coef.double(), torch.from_numpy(coef[exact]), rtol=0, atol=1e-7)
    again = ConditionalMean(n_inputs, grid, rank=2, exact=exact)
    again.load_state_dict(path.state_dict())
    torch.testing.assert_close(again.coefficients(), path.coefficients())
    with pytest.raises(RuntimeError, match="basis"):  # a checkpoint of a path without them is refused
        again.load_state_dict(ConditionalMean(n_inputs, grid, rank=2).state_dict())
