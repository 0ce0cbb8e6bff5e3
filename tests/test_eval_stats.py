"""Known answers for the paired statistics, likelihood bounds, PCA-equivalent dimension, duplicates and criteria."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from cbvae_ext.evaluation.baselines import TopicRidgeBaseline, equivalent_dimension
from cbvae_ext.evaluation.conditional import identification
from cbvae_ext.evaluation.criteria import PAIRED_CRITERIA, evaluate_criteria
from cbvae_ext.evaluation.duplicates import duplicate_report
from cbvae_ext.evaluation.likelihood import entropy_floor, importance_weighted_bound, latent_free_nll
from cbvae_ext.evaluation.metrics import pearson_r
from cbvae_ext.evaluation.stats import balanced_accuracy_terms, bootstrap_summary, paired_bootstrap


def test_bootstrap_summary_numbers():
    values = np.random.default_rng(0).normal(0.3, 0.1, 400)
    s = bootstrap_summary(np.append(values, np.nan), n_bootstrap=1000, seed=0)
    assert s["n"] == 400 and s["n_missing"] == 1 and s["n_bootstrap"] == 1000
    assert s["mean"] == pytest.approx(values.mean())
    assert s["sd"] == pytest.approx(values.std(ddof=1))
    lo, hi = s["ci95"]
    assert hi - lo == pytest.approx(2 * 1.96 * values.std(ddof=1) / 20, rel=0.15)
    assert bootstrap_summary(values, seed=0) == bootstrap_summary(values, seed=0)  # seeded
    assert bootstrap_summary(np.array([np.nan]))["mean"] is None
    with pytest.raises(ValueError, match="n_bootstrap must be >= 1"):
        bootstrap_summary(values, n_bootstrap=0)


def test_paired_bootstrap_of_identical_methods_straddles_zero():
    rng = np.random.default_rng(0)
    truth = rng.normal(0.3, 0.1, 300)
    # two methods of identical quality: each map's score is the truth plus independent noise
    a, b = truth + rng.normal(0, 0.05, 300), truth + rng.normal(0, 0.05, 300)
    res = paired_bootstrap(a, b, "greater", n_bootstrap=2000, seed=0)
    assert res["ci95"][0] < 0 < res["ci95"][1] and res["passed"] is False
    assert paired_bootstrap(a, b, "less", n_bootstrap=2000, seed=0)["passed"] is False
    assert paired_bootstrap(a, a, "greater")["passed"] is False  # a tie is not a win
    # a small but consistent gain is found by pairing although the two unpaired CIs overlap
    better = b + 0.01
    paired = paired_bootstrap(better, b, "greater", n_bootstrap=2000, seed=0)
    assert paired["passed"] is True and paired["mean_diff"] == pytest.approx(0.01)
    sa, sb = bootstrap_summary(better), bootstrap_summary(b)
    assert sa["ci95"][0] < sb["ci95"][1]
    assert paired_bootstrap(better, b, "less")["passed"] is False
    # margin: a - b > -margin
    worse = b - 0.01
    assert paired_bootstrap(worse, b, "greater", margin=0.03)["passed"] is True
    assert paired_bootstrap(worse, b, "greater")["passed"] is False
    with_nan = paired_bootstrap(np.append(a, np.nan), np.append(b, 1.0))
    assert with_nan["n"] == 300 and with_nan["n_missing"] == 1
    with pytest.raises(ValueError, match="same maps"):
        paired_bootstrap(a, b[:10])


def test_balanced_accuracy_terms_average_to_the_balanced_accuracy():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    y[:150] = 0  # unbalanced classes
    pred = np.where(rng.random(200) < 0.6, y, rng.integers(0, 4, 200))
    assert balanced_accuracy_terms(y, pred).mean() == pytest.approx(balanced_accuracy_score(y, pred))


def test_entropy_floor_is_the_nll_of_the_map_itself():
    rng = np.random.default_rng(0)
    x = rng.random((3, 40))
    x[0, :5] = 0.0
    x[1, :5] = 1.0
    floor = entropy_floor(x)
    assert floor[2] == pytest.approx(-(x[2] * np.log(x[2]) + (1 - x[2]) * np.log(1 - x[2])).sum())
    np.testing.assert_allclose(latent_free_nll(x, x), floor, atol=1e-3)  # minimal at p = x
    assert (latent_free_nll(x.mean(axis=0), x) > floor).all()
    assert entropy_floor(np.zeros((1, 10)))[0] == 0.0


def _gaussian_model(x: float):
    """x | z ~ N(z, 1), z ~ N(0, 1): log p(x) = log N(x; 0, 2), posterior N(x / 2, 1 / 2)."""

    def log_likelihood(z: torch.Tensor) -> torch.Tensor:
        return -0.5 * ((x - z[:, 0]) ** 2 + math.log(2 * math.pi))

    log_px = -0.5 * (x * x / 2 + math.log(2 * math.pi * 2))
    return log_likelihood, log_px


def test_iwae_bound_known_answers():
    log_likelihood, log_px = _gaussian_model(1.5)
    gen = torch.Generator().manual_seed(0)
    # a poor proposal (the prior): ELBO < IWAE <= log p(x), IWAE close to log p(x) for large k
    mu, logvar = torch.zeros(1, 1), torch.zeros(1, 1)
    k1 = importance_weighted_bound(log_likelihood, mu, logvar, 1, torch.Generator().manual_seed(1))
    assert k1["iwae"].item() == pytest.approx(k1["elbo"].item())  # k = 1: the two coincide
    many = importance_weighted_bound(log_likelihood, mu, logvar, 4000, gen)
    assert many["iwae"].item() >= many["elbo"].item()
    assert many["iwae"].item() == pytest.approx(log_px, abs=0.03)
    # ELBO with q = prior: E[log p(x | z)] - 0 = -(x² + 1 + log 2π) / 2
    assert many["elbo"].item() == pytest.approx(-0.5 * (1.5**2 + 1 + math.log(2 * math.pi)), abs=0.1)
    # the exact posterior makes every weight p(x): both bounds are log p(x) exactly
    exact = importance_weighted_bound(
        log_likelihood, torch.full((1, 1), 0.75), torch.full((1, 1), math.log(0.5)), 8, gen
    )
    assert exact["iwae"].item() == pytest.approx(log_px, abs=1e-5)
    assert exact["elbo"].item() == pytest.approx(log_px, abs=1e-5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        importance_weighted_bound(log_likelihood, mu, logvar, 0)


def test_pca_equivalent_dimension_interpolates_in_log_components():
    dims, scores = [32, 64, 128, 256], [0.30, 0.40, 0.50, 0.60]
    assert equivalent_dimension(dims, scores, 0.40) == {"components": pytest.approx(64.0), "bound": None}
    assert equivalent_dimension(dims, scores, 0.45)["components"] == pytest.approx(64 * math.sqrt(2))
    assert equivalent_dimension(dims, scores, 0.25) == {"components": None, "bound": "below"}
    assert equivalent_dimension(dims, scores, 0.70) == {"components": None, "bound": "above"}


def test_near_duplicates_are_counted():
    rng = np.random.default_rng(0)
    train = rng.random((50, 300)).astype(np.float32)
    test = rng.random((4, 300)).astype(np.float32)
    test[0] = train[7]  # an exact duplicate study
    test[1] = train[20] + rng.normal(0, 0.01, 300)  # the same coordinates rendered slightly differently
    test[2] = 0.5 * train[3] + 0.5 * test[3]  # related but not a duplicate (r ~ 0.7)
    report = duplicate_report(test, train, [f"t{i}" for i in range(4)], [f"s{i}" for i in range(50)])
    assert report["n_exact"] == 1 and report["n_near"] == 2
    assert [(p["test_id"], p["train_id"], p["exact"]) for p in report["pairs"]] == [
        ("t0", "s7", True),
        ("t1", "s20", False),
    ]
    assert report["nearest_r"][0] == pytest.approx(1.0) and 0.6 < report["nearest_r"][2] < 0.8


def test_identification_and_topic_ridge():
    rng = np.random.default_rng(0)
    means = rng.random((5, 100))
    res = identification(means + rng.normal(0, 0.05, means.shape), means, list("abcde"))
    assert res["n_correct"] == 5 and res["best"] == [0, 1, 2, 3, 4]
    swapped = identification(means[[1, 0, 2, 3, 4]], means, list("abcde"))
    assert swapped["n_correct"] == 3 and swapped["best"][:2] == [1, 0]
    topics = rng.dirichlet(np.ones(6), size=300)
    basis = rng.random((6, 80))
    maps = topics @ basis + rng.normal(0, 0.01, (300, 80))
    ridge = TopicRidgeBaseline().fit(topics[:250], maps[:250])
    assert np.mean(pearson_r(ridge.predict(topics[250:]), maps[250:])) > 0.9


def test_criteria_from_a_per_map_table():
    rng = np.random.default_rng(0)
    n = 200
    r = rng.normal(0.3, 0.1, n)
    table = pd.DataFrame(
        {
            "cbvae/recon/pearson_r": r + 0.05,
            "pca_8/pearson_r": r,
            "pca_16/pearson_r": r + 0.05 + rng.normal(0, 0.05, n),  # same quality as the model: no claim
            "cbvae/hidden_all/pearson_r": r + 0.04,  # 0.01 below given: within 0.03
        }
    )
    crit = evaluate_criteria(table, 8, 500, 0, absent={"uncond": "no --uncond_run_dir given"})
    assert set(crit) == set(PAIRED_CRITERIA)
    assert crit["r_above_pca"]["passed"] is True and crit["r_above_pca"]["mean_diff"] == pytest.approx(0.05)
    assert crit["r_above_pca_2L"]["passed"] is False
    assert crit["all_hidden_within_0.03"]["passed"] is True
    assert crit["conditioning_gain"] == {
        "rule": crit["conditioning_gain"]["rule"],
        "passed": None,
        "reason": "no --uncond_run_dir given",
    }
    assert (
        crit["dice_top1_above_pca"]["passed"] is None
        and "cbvae/recon/dice_top1" in crit["dice_top1_above_pca"]["reason"]
    )


def test_hiding_a_condition_group_zeroes_its_values_and_mask():
    import torch

    from cbvae_ext.networks.conditioning import hide_groups
    from cbvae_ext.schema import MetadataSchema

    schema = MetadataSchema.fit(
        ["motor", "memory", "other"], {"year": np.linspace(1995, 2020, 40)}, topic_names=["t0", "t1", "t2"]
    )
    groups = {g.name: g for g in schema.groups}
    assert list(groups) == ["year", "sample_size", "field_strength", "fwhm", "topics", "task"]
    meta, mask = torch.ones(2, schema.meta_dim), torch.ones(2, schema.mask_dim)
    hidden_meta, hidden_mask = hide_groups(meta, mask, [groups["topics"]])
    assert (hidden_meta[:, groups["topics"].meta_slice] == 0).all() and (hidden_mask[:, 4] == 0).all()
    assert hidden_meta.sum() == meta.sum() - 2 * 3 and hidden_mask.sum() == mask.sum() - 2
    assert meta.min() == 1.0  # the input is not modified
