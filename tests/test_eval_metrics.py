"""Known-answer checks of the evaluation metrics, baselines, probes and imputation scores."""

from __future__ import annotations

import numpy as np
import pytest

from cbvae_ext.evaluation.baselines import CategoryMeanBaseline, MeanMapBaseline, PCABaseline
from cbvae_ext.evaluation.imputation import imputation_scores
from cbvae_ext.evaluation.metrics import (
    SSIM_PARAMS,
    masked_vectors,
    peak_auc,
    pearson_r,
    ssim_masked,
    to_volumes,
    topk_dice,
)
from cbvae_ext.evaluation.probes import adversary_balanced_accuracy, year_probes, year_r2


@pytest.fixture
def maps() -> np.ndarray:
    return np.random.default_rng(0).random((4, 200))


def test_pearson_identical_anticorrelated_and_constant(maps):
    np.testing.assert_allclose(pearson_r(maps, maps), 1.0)
    np.testing.assert_allclose(pearson_r(1.0 - maps, maps), -1.0)
    np.testing.assert_allclose(pearson_r(3 * maps + 2, maps), 1.0)  # invariant to affine rescaling
    r = pearson_r(np.ones_like(maps), maps)
    assert np.isnan(r).all()
    with pytest.raises(ValueError, match="shape"):
        pearson_r(maps, maps[:, :10])


def test_pearson_matches_numpy(maps):
    other = np.random.default_rng(1).random(maps.shape)
    expected = [np.corrcoef(a, b)[0, 1] for a, b in zip(other, maps, strict=True)]
    np.testing.assert_allclose(pearson_r(other, maps), expected, atol=1e-12)


def test_topk_dice_identical_disjoint_and_half():
    target = np.arange(100, dtype=float)[None]  # top 5% = voxels 95..99
    assert topk_dice(target, target, 0.05)[0] == 1.0
    assert topk_dice(-target, target, 0.05)[0] == 0.0  # top voxels are 0..4: disjoint
    half = target.copy()
    half[0, [95, 96]] = -1  # two of the five top voxels drop out, replaced by 93 and 94
    assert topk_dice(half, target, 0.05)[0] == pytest.approx(3 / 5)
    assert topk_dice(target, target, 0.01)[0] == 1.0  # k = 1
    with pytest.raises(ValueError, match="fraction"):
        topk_dice(target, target, 0.0)


def test_topk_dice_ties_are_shared_whatever_the_voxel_order():
    rng = np.random.default_rng(0)
    # a sparse target: 3 nonzero voxels, k = 5 -> two of the five places go to 97 tied zeros
    target = np.zeros((1, 100))
    target[0, [10, 50, 90]] = [1.0, 0.8, 0.6]
    pred = rng.random((1, 100))
    pred[0, [10, 50, 90]] = 2.0
    dice = topk_dice(pred, target, 0.05)[0]
    # the three peaks overlap fully; each of pred's 2 other top voxels is a zero of target: weight 2/97 each
    assert dice == pytest.approx((3 + 2 * 2 / 97) / 5)
    perm = rng.permutation(100)
    assert topk_dice(pred[:, perm], target[:, perm], 0.05)[0] == pytest.approx(dice)
    # a constant prediction ties everywhere: its expected overlap is k * k / V
    assert topk_dice(np.ones((1, 100)), target, 0.05)[0] == pytest.approx(5 / 100)


def _ssim_constant(c: float, d: float) -> float:
    """SSIM of two constant images (every window): (2cd + C1) / (c² + d² + C1), the contrast term is 1."""
    c1 = (SSIM_PARAMS["K1"] * SSIM_PARAMS["data_range"]) ** 2
    return (2 * c * d + c1) / (c * c + d * d + c1)


def test_masked_ssim_of_a_constant_map_is_the_formula():
    mask = np.zeros((12, 13, 11), dtype=bool)
    mask[1:11, 2:12, 1:10] = True  # a box: its bounding box is the mask, every window sees in-mask voxels only
    v = int(mask.sum())
    np.testing.assert_allclose(
        ssim_masked(np.full((1, v), 0.05), np.full((1, v), 0.4), mask), _ssim_constant(0.05, 0.4)
    )
    rng = np.random.default_rng(0)
    real = rng.random((2, v))
    np.testing.assert_allclose(ssim_masked(real, real, mask), 1.0)
    noisy = np.clip(real + rng.normal(0, 0.3, real.shape), 0, 1)
    assert (ssim_masked(noisy, real, mask) < 0.9).all()
    # a near-empty map against a constant: nothing outside the brain props it up
    assert ssim_masked(np.full((1, v), 1e-3), np.full((1, v), 0.5), mask)[0] == pytest.approx(_ssim_constant(1e-3, 0.5))
    assert _ssim_constant(1e-3, 0.5) < 0.01


def test_peak_auc_known_answers():
    rng = np.random.default_rng(0)
    peaks = np.zeros((3, 50), dtype=bool)
    peaks[:, [3, 17, 40]] = True
    assert peak_auc(peaks.astype(float), peaks)[0] == 1.0  # the indicator itself ranks peaks first
    assert peak_auc(1.0 - peaks, peaks)[0] == 0.0
    assert peak_auc(np.ones((1, 50)), peaks[:1])[0] == 0.5  # all tied: chance
    x = rng.random((1, 50))
    expected = np.mean([[a > b for b in x[0][~peaks[0]]] for a in x[0][peaks[0]]])
    assert peak_auc(x, peaks[:1])[0] == pytest.approx(expected)
    assert np.isnan(peak_auc(x, np.zeros((1, 50), dtype=bool))[0])


def test_masked_vectors_roundtrip():
    mask = np.zeros((3, 4, 5), dtype=np.uint8)
    mask[1, 1:3, 2:4] = 1
    vol = np.random.default_rng(0).random((2, 1, 3, 4, 5)).astype(np.float32)
    vec = masked_vectors(vol, mask)
    assert vec.shape == (2, 4)
    np.testing.assert_array_equal(to_volumes(vec, mask)[:, mask.astype(bool)], vec)
    assert to_volumes(vec, mask)[:, ~mask.astype(bool)].max() == 0


def test_pca_baseline_reconstructs_rank_k_data_exactly():
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(3, 50))
    train = rng.normal(size=(40, 3)) @ basis + 0.5
    test = rng.normal(size=(7, 3)) @ basis + 0.5
    pca = PCABaseline(n_components=3).fit(train)
    np.testing.assert_allclose(pca.predict(test), test, atol=1e-4)
    assert pca.explained_variance_ratio == pytest.approx(1.0)
    # one component too few loses information
    assert np.abs(PCABaseline(2).fit(train).predict(test) - test).max() > 0.1
    with pytest.raises(ValueError, match="n_components"):
        PCABaseline(60).fit(train)


def test_mean_and_category_mean_baselines():
    train = np.array([[0.0, 1.0], [2.0, 3.0], [10.0, 10.0], [20.0, 30.0]])
    cats = [0, 0, 1, -1]
    np.testing.assert_allclose(MeanMapBaseline().fit(train).predict(2), [[8.0, 11.0]] * 2)
    cm = CategoryMeanBaseline().fit(train, cats)
    np.testing.assert_allclose(cm.predict([1, 0, -1, 7]), [[10, 10], [1, 2], [8, 11], [8, 11]])


def test_probe_at_chance_on_label_free_codes_and_above_on_informative_codes():
    rng = np.random.default_rng(0)
    n_bins, n = 5, 300
    y_train, y_test = rng.integers(0, n_bins, n), rng.integers(0, n_bins, n)
    noise_train, noise_test = rng.normal(size=(n, n_bins)), rng.normal(size=(n, n_bins))
    free = year_probes(noise_train, y_train, noise_test, y_test, n_permutations=20, mlp_max_iter=50)
    # informative codes: the bin's one-hot, scaled well above the noise
    informative = year_probes(
        noise_train + 3.0 * np.eye(n_bins)[y_train],
        y_train,
        noise_test + 3.0 * np.eye(n_bins)[y_test],
        y_test,
        n_permutations=20,
        mlp_max_iter=50,
    )
    for name in ("logistic", "mlp"):
        assert free[name]["null"]["mean"] == pytest.approx(1 / n_bins, abs=0.03)
        # label-free codes score inside their own null, informative ones far outside it
        assert abs(free[name]["balanced_accuracy"] - free[name]["null"]["mean"]) < 0.06
        assert free[name]["balanced_accuracy"] <= max(free[name]["null"]["values"]) + 0.02
        assert informative[name]["balanced_accuracy"] > 0.8
        assert informative[name]["balanced_accuracy"] > informative[name]["null"]["p95"]
        assert informative[name]["p_value"] == pytest.approx(1 / 21)
        assert len(informative[name]["null"]["values"]) == 20
    # missing years (-1) are dropped before fitting
    y_missing = y_train.copy()
    y_missing[:10] = -1
    assert year_probes(noise_train, y_missing, noise_test, y_test, n_permutations=2)["logistic"]["n_train"] == n - 10


def test_year_r2_and_adversary_accuracy():
    rng = np.random.default_rng(0)
    year_tr, year_te = rng.uniform(2000, 2020, 200), rng.uniform(2000, 2020, 100)
    mu_tr = np.c_[year_tr, rng.normal(size=200)]
    mu_te = np.c_[year_te, rng.normal(size=100)]
    assert year_r2(mu_tr, year_tr, mu_te, year_te) == pytest.approx(1.0, abs=1e-3)
    assert year_r2(rng.normal(size=(200, 2)), year_tr, rng.normal(size=(100, 2)), year_te) < 0.05
    logits = np.eye(3)[[0, 1, 2, 2]]
    assert adversary_balanced_accuracy(logits, np.array([0, 1, 2, -1])) == 1.0
    assert adversary_balanced_accuracy(logits, np.array([1, 2, 0, 0])) == 0.0
    assert adversary_balanced_accuracy(logits, np.array([-1] * 4)) is None


def test_imputation_scores_against_median():
    true = np.array([10.0, 20.0, 30.0, 40.0, np.nan])
    perfect = imputation_scores(true + 1.0, true, train_median=25.0)
    assert perfect["n"] == 4 and perfect["spearman_rho"] == pytest.approx(1.0)
    assert perfect["mae"] == pytest.approx(1.0) and perfect["median_mae"] == pytest.approx(10.0)
    assert perfect["beats_median"] is True
    flipped = imputation_scores(np.array([40.0, 30.0, 20.0, 10.0]), true[:4], 25.0)
    assert flipped["spearman_rho"] == pytest.approx(-1.0) and flipped["beats_median"] is False
    none = imputation_scores(np.ones(2), np.full(2, np.nan), 5.0)
    assert none["n"] == 0 and none["beats_median"] is None
