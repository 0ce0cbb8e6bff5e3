"""The conditional-mean fit's task penalty chosen by category identification on validation, not MSE alone."""

from __future__ import annotations

import numpy as np
import pytest

from cbvae_ext.networks.conditioning import _identification_score, fit_ridge


def _data(seed: int = 0, n: int = 40, v: int = 64):
    rng = np.random.default_rng(seed)
    patterns = rng.normal(size=(2, v))
    labels = np.arange(n) % 2
    x = np.eye(2)[labels]
    y = 0.3 * patterns[labels] + rng.normal(size=(n, v))
    return x, y, labels, patterns


def test_identification_score_counts_own_category_matches_then_mse():
    _, _, labels, patterns = _data()
    y_val = patterns[labels]
    right = _identification_score([patterns[labels]], y_val, labels)
    swapped = _identification_score([patterns[1 - labels]], y_val, labels)
    assert right == -2.0  # both identified, MSE 0
    assert swapped > -1.0  # none identified (+ its MSE)


def test_fit_ridge_uses_the_criterion_over_mse():
    x, y, labels, _ = _data()
    xv, yv, lv, _ = _data(seed=1, n=10)
    penalties = [np.full(2, p) for p in (1e-3, 1e1, 1e6)]
    args = (x, lambda r: y[r], [xv], lambda r: yv[r], penalties)
    _, _, best_mse, mse = fit_ridge(*args, voxel_step=1)
    assert best_mse == int(np.argmin(mse))
    # a criterion that prefers the least shrinkage picks the smallest penalty whatever the MSE says
    _, coef, best, scores = fit_ridge(*args, voxel_step=1, criterion=lambda preds, yval: -np.ptp(preds[0]))
    assert best == 0 and scores[0] < scores[2]
    # and with the smallest penalty the task maps are the training category means (ridge on a one-hot)
    means = np.stack([y[labels == c].mean(0) for c in (0, 1)])
    np.testing.assert_allclose(coef[1] - coef[0], means[1] - means[0], atol=1e-3)


def test_initialise_keeps_the_task_map_identifying_on_validation(tmp_path):
    from pathlib import Path

    import torch

    from cbvae_ext.data import build_dataset, load_dataset_info, normalise_maps
    from cbvae_ext.evaluation.conditional import identification
    from cbvae_ext.networks import build_network, initialise_from_data, preset_config

    fixture = Path(__file__).parent / "data" / "neurosynth"
    info = load_dataset_info(build_dataset(neurosynth_dir=fixture, out=tmp_path / "ds", subset=200))
    val = info.rows("val")
    labels = info.category_index(val)
    present = sorted(set(labels.tolist()) - {-1})
    y = normalise_maps(np.asarray(info.maps[val], np.float32)).numpy()[:, info.mask]
    heldout = np.stack([y[labels == c].mean(0) for c in present])
    task = info.schema.group("task")
    m = np.zeros((len(present), info.schema.meta_dim + info.schema.mask_dim), np.float32)
    m[np.arange(len(present)), task.meta_slice.start + np.array(present)] = 1.0
    m[:, info.schema.meta_dim + task.mask_index] = 1.0
    counts = {}
    for flag in (False, True):
        model = build_network(preset_config("cpu", info.schema, info.mask.shape))
        initialise_from_data(model, info.path, identify_task=flag)
        with torch.no_grad():
            maps = torch.sigmoid(model.conditional_mean(torch.from_numpy(m))).numpy()[:, 0][:, info.mask]
        counts[flag] = identification(maps, heldout, [str(c) for c in present])["n_correct"]
    assert counts[True] >= counts[False]


@pytest.mark.parametrize("by", ["mse", "peak_auc"])
def test_a_group_with_its_own_penalty_keeps_the_other_two(tiny_dataset, by):
    """``own_penalty``: the other two strengths are those of the shared fit; the third comes from the grid (by
    validation MSE or peak AUC), and where it equals the shared strength the path is the shared fit's."""
    import torch

    from cbvae_ext.data import load_dataset_info
    from cbvae_ext.networks import build_network, initialise_from_data, preset_config

    info = load_dataset_info(tiny_dataset)
    paths = {}
    for own in ((), ("terms",)):
        model = build_network(preset_config("cpu", info.schema, info.mask.shape))
        paths[own] = initialise_from_data(
            model, info.path, identify_task=False, own_penalty=own, own_penalty_by=by, residual_groups=()
        ).cond_mean
    shared, separate = paths[()].alpha, paths[("terms",)].alpha
    assert len(shared) == 2 and len(separate) == 3 and tuple(separate[:2]) == tuple(shared)
    assert separate[2] in 10.0 ** np.arange(0, 7)
    coef = {k: p.coefficients().detach() for k, p in paths.items()}
    same = torch.allclose(coef[()], coef[("terms",)], rtol=1e-4, atol=1e-6)
    assert same == (separate[2] == shared[0])
    with pytest.raises(ValueError, match="own_penalty_by must be"):
        initialise_from_data(model, info.path, own_penalty=("terms",), own_penalty_by="auc")


def test_the_peak_auc_criterion_is_the_mean_peak_auc_of_the_all_given_maps():
    from cbvae_ext.evaluation.metrics import peak_auc
    from cbvae_ext.networks.conditioning import _peak_auc_score

    rng = np.random.default_rng(0)
    y = rng.random((6, 50))
    y[np.arange(6), rng.integers(0, 50, 6)] = 1.0
    y[5] = 0.5  # no peak voxel sampled: left out, not a zero
    good, bad = y + 0.1 * rng.random(y.shape), rng.random(y.shape)
    expect = np.nanmean(peak_auc(good, y >= 1.0))
    assert _peak_auc_score([good, bad], y) == pytest.approx(-expect)
    assert _peak_auc_score([good], y) < _peak_auc_score([bad], y)


def test_a_residual_group_leaves_the_path_without_it_unchanged(tiny_dataset):
    """``residual_groups``: the rows without the group get exactly the path fitted without it (at a rank that
    stores the coefficients exactly); the rows with it get that path plus the group's own fit."""
    import torch

    from cbvae_ext.data import load_dataset_info
    from cbvae_ext.networks import build_network, initialise_from_data, preset_config
    from cbvae_ext.networks.conditioning import hide_groups

    info = load_dataset_info(tiny_dataset)
    paths = {}
    for key, options in (("hidden", {"hidden_groups": ("terms",)}), ("residual", {})):
        model = build_network(preset_config("cpu", info.schema, info.mask.shape, cond_mean_rank=1024))
        paths[key] = initialise_from_data(model, info.path, **options)
    assert len(paths["residual"].cond_mean.alpha) == 3
    meta, mask = (torch.from_numpy(a) for a in info.encode(info.rows("val")))
    hide = torch.tensor([g.name == "terms" for g in info.schema.groups]).expand(len(meta), -1)
    without = torch.cat(hide_groups(meta, mask, info.schema.groups, hide), dim=1)
    with_text = torch.cat([meta, mask], dim=1)
    has = mask[:, info.schema.group("terms").mask_index] > 0
    assert has.any()
    with torch.no_grad():
        out = {k: (p.conditional_mean(without), p.conditional_mean(with_text)) for k, p in paths.items()}
    torch.testing.assert_close(out["residual"][0], out["hidden"][0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out["residual"][1][has], out["hidden"][1][has], atol=1e-3)


def test_the_text_groups_maps_are_kept_outside_the_paths_rank(tiny_dataset):
    """``cond_mean_exact`` (the preset's ``[terms]``): the group's coefficient maps are stored as fitted, those of
    a path of full rank; a path without it truncates them with the rest. The other rows are the best rank-r
    approximation of the coefficients without the group's rows."""
    import torch

    from cbvae_ext.data import load_dataset_info
    from cbvae_ext.networks import build_network, initialise_from_data, preset_config

    info = load_dataset_info(tiny_dataset)
    g, meta_dim = info.schema.group("terms"), info.schema.meta_dim
    rows = [*range(g.meta_slice.start, g.meta_slice.stop), meta_dim + g.mask_index]
    paths = {}
    for key, options in (
        ("exact", {"cond_mean_rank": 2}),
        ("truncated", {"cond_mean_rank": 2, "cond_mean_exact": []}),
        ("full", {"cond_mean_rank": 1024, "cond_mean_exact": []}),
    ):
        model = build_network(preset_config("cpu", info.schema, info.mask.shape, **options))
        paths[key] = initialise_from_data(model, info.path).cond_mean
    exact, truncated, full = paths["exact"], paths["truncated"], paths["full"]
    assert exact.exact_index.tolist() == rows and not len(truncated.exact_index)
    coef = full.coefficients().double()  # every coefficient, as fitted
    torch.testing.assert_close(exact.exact_coef.double(), coef[rows], rtol=0, atol=1e-5 * coef.abs().max().item())
    cut = truncated.coefficients().double()
    assert (cut[rows] - coef[rows]).abs().max() > 1e-3 * coef[rows].abs().max()
    rest = coef.clone()
    rest[rows] = 0.0
    a, s, vh = torch.linalg.svd(rest, full_matrices=False)
    best = (a[:, :2] * s[:2]) @ vh[:2]
    low = (exact.weight.T @ exact.basis[:2]).double()
    torch.testing.assert_close(low, best, rtol=0, atol=1e-4 * coef.abs().max().item())
    torch.testing.assert_close(
        exact.coefficients().double(),
        best.index_put((torch.tensor(rows),), coef[rows]),
        rtol=0,
        atol=1e-4 * coef.abs().max().item(),
    )
