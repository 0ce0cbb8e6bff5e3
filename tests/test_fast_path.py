"""The fast path (``set_fast_path``: network blocks, FiLM, conditional mean, loss) computes what the plain path
computes, with the same parameters: outputs, every loss term, gradients and batch-norm statistics agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cbvae_ext.data import CATEGORIES
from cbvae_ext.engine.losses import CBVAELoss, LossError
from cbvae_ext.networks import build_network, preset_config
from cbvae_ext.networks.dense3d import SpaceToDepth, set_fast_path
from cbvae_ext.schema import MetadataSchema

SHAPE = [21, 26, 21]  # odd sizes: the stem pads, the head crops


@pytest.fixture(scope="module")
def schema() -> MetadataSchema:
    rng = np.random.default_rng(0)
    values = {"year": rng.uniform(1995, 2015, 200), "sample_size": rng.integers(8, 60, 200).astype(float)}
    return MetadataSchema.fit(CATEGORIES, values)


def _inputs(schema: MetadataSchema, n: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    meta = torch.zeros(n, schema.meta_dim)
    meta[:, :2] = torch.randn(n, 2, generator=g)
    meta[torch.arange(n), schema.n_continuous + torch.arange(n)] = 1.0
    meta_mask = torch.zeros(n, schema.mask_dim)
    meta_mask[:, [0, 1, schema.n_continuous]] = 1.0
    image = torch.rand(n, 1, *SHAPE, generator=g) ** 4  # sparse-ish maps in [0, 1]
    return {"image": image, "meta": meta, "meta_mask": meta_mask, "year_bin": torch.tensor([0, 3, -1, 9][:n])}


def _brain_mask() -> torch.Tensor:
    grid = torch.stack(torch.meshgrid(*(torch.linspace(-1, 1, s) for s in SHAPE), indexing="ij"))
    return grid.square().sum(0) < 0.8  # an ellipsoid: about 40% of the box


def _pair(schema: MetadataSchema, model: str, **overrides) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A plain and a fast network with the same weights, FiLM and output layers off their identity init."""
    torch.manual_seed(0)
    plain = set_fast_path(build_network(preset_config("cpu", schema, SHAPE, model, **overrides)), False)
    for name, p in plain.named_parameters():
        if "film.mlp.4" in name or "head" in name:
            torch.nn.init.normal_(p, std=0.3)
    torch.manual_seed(0)
    fast = build_network(preset_config("cpu", schema, SHAPE, model, **overrides))
    fast.load_state_dict(plain.state_dict())
    return plain, fast


def _run(net: torch.nn.Module, loss: CBVAELoss, batch: dict[str, torch.Tensor], channels_last: bool):
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt).train()
    torch.manual_seed(7)  # the same condition dropout and posterior draw in both paths
    out = net(batch["image"].contiguous(memory_format=fmt), batch["meta"], batch["meta_mask"])
    terms = loss(out, batch)
    terms["loss"].backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return out, terms, grads


LEAN = {"lean_finest_grid": True}


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    ("model", "overrides"), [("cbvae", {"lean_finest_grid": False}), ("cbvae", LEAN), ("baseline", {})]
)
def test_fast_path_trains_like_the_plain_path(
    schema: MetadataSchema, model: str, overrides: dict, channels_last: bool
) -> None:
    plain, fast = _pair(schema, model, **overrides)
    batch = _inputs(schema)
    loss_plain = set_fast_path(CBVAELoss(mask=_brain_mask(), free_bits=4.0), False)
    out0, terms0, grads0 = _run(plain, loss_plain, batch, channels_last)
    out1, terms1, grads1 = _run(fast, CBVAELoss(mask=_brain_mask(), free_bits=4.0), batch, channels_last)
    for key, value in out0.items():
        if value is not None:
            torch.testing.assert_close(out1[key], value, rtol=1e-4, atol=1e-4, msg=key)
    for key, value in terms0.items():
        torch.testing.assert_close(terms1[key], value, rtol=1e-5, atol=1e-3, equal_nan=True, msg=key)
    assert grads0.keys() == grads1.keys()
    # relative to each gradient, plus a floor for the conv biases right before a batch norm (0 up to rounding)
    floor = 1e-5 * max(g.abs().max() for g in grads0.values())
    for name, g in grads0.items():
        assert (grads1[name] - g).abs().max() <= 1e-3 * g.abs().max() + floor, name
    for (name, b0), b1 in zip(plain.named_buffers(), fast.buffers(), strict=True):
        torch.testing.assert_close(b1, b0, rtol=1e-4, atol=1e-5, msg=name)  # running statistics updated alike
    # evaluation (running statistics) and the decoder alone agree too
    plain.eval(), fast.eval()
    z, m = out0["mu"].detach(), plain.decoder_input(batch["meta"], batch["meta_mask"], None)
    with torch.no_grad():
        torch.testing.assert_close(fast.decode(z, m), plain.decode(z, m), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block_layers", [[0, 2], [1, 2]])
def test_lean_network_drops_the_repeated_finest_grid_passes(schema: MetadataSchema, block_layers: list[int]) -> None:
    """Lean: the stem is a bare conv and (where the finest level has no dense layers) the decoder's last mix
    is gone, with their FiLM channels; everything else, and the default network, is unchanged."""
    arch = {"block_layers": block_layers}
    full = build_network(preset_config("cpu", schema, SHAPE, **arch, lean_finest_grid=False))
    lean = build_network(preset_config("cpu", schema, SHAPE, **arch, **LEAN))
    assert preset_config("cpu", schema, SHAPE)["lean_finest_grid"] is True  # the default (train.yaml)
    assert not build_network(
        {k: v for k, v in preset_config("cpu", schema, SHAPE).items() if k != "lean_finest_grid"}
    ).encoder.stem.lean  # an older run folder's config
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in full.encoder.stem.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in lean.encoder.stem.modules())
    channels = full.encoder.film.channels
    assert lean.encoder.film.channels == channels[1:]  # the stem's FiLM layer, first in the list, dropped
    mixes_dropped = 1 if block_layers[0] == 0 else 0  # a finest level with dense layers needs its mix
    assert len(lean.decoder.film.channels) == len(full.decoder.film.channels) - mixes_dropped
    gone = set(full.state_dict()) - set(lean.state_dict())
    assert gone and all(
        k.startswith(("encoder.stem.conv.post", "decoder.mixes.1", "encoder.film", "decoder.film")) for k in gone
    )
    assert set(lean.state_dict()) <= set(full.state_dict())


def test_fast_stem_skips_the_space_to_depth_copy(schema: MetadataSchema) -> None:
    """The fast stem convolves the map itself (kernel 2, stride 2), the plain one reshuffles it first."""
    calls = []
    plain, fast = _pair(schema, "cbvae")
    for net in (plain, fast):
        for module in net.modules():
            if isinstance(module, SpaceToDepth):
                module.register_forward_hook(lambda *_: calls.append(1))
    batch = _inputs(schema)
    with torch.no_grad():
        plain.encode(batch["image"], batch["meta"], batch["meta_mask"])
        assert len(calls) == 1
        fast.encode(batch["image"], batch["meta"], batch["meta_mask"])
    assert len(calls) == 1
    assert set_fast_path(plain, True) is plain and all(
        m.fast for m in plain.modules() if hasattr(m, "fast")
    )  # the switch reaches every block, both ways


def test_fast_loss_sums_only_in_mask_voxels() -> None:
    """The gathered loss: garbage outside the mask is ignored, a wrong grid is refused with the grids named."""
    mask = _brain_mask()
    loss = CBVAELoss(mask=mask)
    assert loss.inside.numel() == int(mask.sum())
    image = torch.rand(2, 1, *SHAPE)
    logits = torch.randn(2, 1, *SHAPE)
    want = torch.nn.functional.binary_cross_entropy_with_logits(logits, image, reduction="none")
    want = (want * mask).flatten(1).sum(1)
    torch.testing.assert_close(loss.reconstruction(logits, image), want)
    noisy = torch.where(mask, logits, torch.full_like(logits, 80.0))
    torch.testing.assert_close(loss.reconstruction(noisy, image), want)
    with pytest.raises(LossError, match=r"recon grid \(20, 26, 21\) differs from mask grid \(21, 26, 21\)"):
        loss.reconstruction(logits[..., 1:, :, :], image[..., 1:, :, :])
