"""The field's protocols (peak log-likelihood, Mitchell's pairs, title tf-idf, counterfactual direction) and the
NeuroQuery baseline, each checked first against the trivial answers it must rank below, on real maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
import torch

from cbvae_ext.evaluation.counterfactual import counterfactual_section, direction_scores
from cbvae_ext.evaluation.metrics import masked_vectors, pearson_r
from cbvae_ext.evaluation.section import EvalData
from cbvae_ext.evaluation.text_protocols import (
    DENSITY_FLOOR,
    NeuroQueryBaseline,
    density,
    mitchell_pairs,
    mitchell_scores,
    peak_log_likelihood,
    title_tfidf,
)

NQ = Path(__file__).parent / "data" / "neuroquery"


@pytest.fixture(scope="module")
def splits(tiny_dataset):
    from cbvae_ext.data import load_dataset_info
    from cbvae_ext.evaluation.passes import load_split

    info = load_dataset_info(tiny_dataset)
    return info, load_split(info, info.rows("train")), load_split(info, info.rows("test"))


def test_density_is_a_density_with_a_floor():
    maps = np.array([[0.0, 1.0, 3.0, -2.0], [0.0, 0.0, 0.0, 0.0]])
    d = density(maps)
    np.testing.assert_allclose(d.sum(axis=1), 1.0)
    assert d[0, 0] == pytest.approx(DENSITY_FLOOR / 4) and d[0, 3] == d[0, 0]  # negative: only the floor
    np.testing.assert_allclose(d[1], 0.25)  # nothing positive: uniform


def test_peak_loglik_ranks_trivial_maps_below_the_truth(splits):
    _, train, test = splits
    peaks = test.maps >= 1.0
    reference = train.maps.mean(axis=0)
    mean_map = peak_log_likelihood(np.broadcast_to(reference, test.maps.shape), peaks, reference)
    np.testing.assert_allclose(mean_map, 0.0, atol=1e-9)  # the reference scores 0 by definition
    constant = peak_log_likelihood(np.full_like(test.maps, 0.3), peaks, reference)
    oracle = peak_log_likelihood(test.maps, peaks, reference)
    assert np.nanmean(constant) < 0 < np.nanmean(oracle)
    assert (constant < oracle).all()
    # another study's map is worse than the study's own
    assert np.nanmean(peak_log_likelihood(np.roll(test.maps, 1, axis=0), peaks, reference)) < np.nanmean(oracle)
    missing = test.maps.copy()
    missing[0] = np.nan
    assert np.isnan(peak_log_likelihood(missing, peaks, reference)[0])


def test_mitchell_pairs_chance_for_one_map_and_perfect_for_the_truth(splits):
    _, train, test = splits
    pairs = mitchell_pairs(test.n, np.random.default_rng(0))
    assert len(pairs) == test.n * (test.n - 1) // 2
    mean = np.broadcast_to(train.maps.mean(axis=0), test.maps.shape)
    acc, per_map = mitchell_scores(mean, test.maps, pairs)
    assert acc == 0.5 and np.allclose(per_map, 0.5)  # one map for every study: every pair a tie
    acc_true, _ = mitchell_scores(test.maps, test.maps, pairs)
    assert acc_true == 1.0
    acc_wrong, _ = mitchell_scores(np.roll(test.maps, 1, axis=0), test.maps, pairs)
    assert acc_wrong < 0.5 + 0.2 and acc_wrong < acc_true
    # per-map shares average back to the accuracy (every map in the same number of pairs)
    acc_train, per_train = mitchell_scores(train.maps[:20], train.maps[:20][::-1], mitchell_pairs(20, None))
    assert np.mean(per_train) == pytest.approx(acc_train)


def test_mitchell_pairs_are_seeded_and_distinct():
    a = mitchell_pairs(200, np.random.default_rng(3), n_pairs=500)
    b = mitchell_pairs(200, np.random.default_rng(3), n_pairs=500)
    np.testing.assert_array_equal(a, b)
    assert len({tuple(p) for p in a}) == 500 and (a[:, 0] < a[:, 1]).all()


def test_title_tfidf_uses_neuroquerys_vocabulary_and_the_training_idf():
    vocabulary = (NQ / "data-neuroquery_version-1_vocab-neuroquery7547_vocabulary.txt").read_text().splitlines()
    idf = np.linspace(1.0, 3.0, len(vocabulary))
    x = title_tfidf(["Working memory and pain in the <b>insula</b>", None, "", "ωμέγα 記憶"], vocabulary, idf)
    assert x.shape == (4, len(vocabulary))
    row = x[0].toarray()[0]
    found = {vocabulary[j] for j in np.flatnonzero(row)}
    assert {"working memory", "memory", "pain", "insula"} <= found  # a phrase also counts its words
    assert np.linalg.norm(row) == pytest.approx(1.0, rel=1e-5)
    j, k = vocabulary.index("pain"), vocabulary.index("insula")
    assert row[j] / row[k] == pytest.approx(idf[j] / idf[k], rel=1e-5)  # same count: ratio of idf
    assert x[1].nnz == x[2].nnz == x[3].nnz == 0  # nothing recognised: empty, never invented


def test_neuroquery_baseline_is_the_librarys_estimator_and_beats_the_mean_map(splits):
    from neuroquery.smoothed_regression import SmoothedRegression

    _, train, _ = splits
    rng = np.random.default_rng(0)
    # a small real-looking problem: 300 terms, 400 voxels of the real maps
    x = scipy.sparse.random(train.n, 300, density=0.05, random_state=0, format="csr") * 3
    y = train.maps[:, rng.choice(train.maps.shape[1], 400, replace=False)]
    ours = NeuroQueryBaseline(n_components=20, max_selection_voxels=10_000).fit(x, y)
    lib = SmoothedRegression(n_components=20).fit(x, y.astype(np.float64))  # selection on all voxels: the same fit
    np.testing.assert_allclose(ours.predict(x), lib.predict(x.toarray()), rtol=1e-4, atol=1e-6)
    assert ours.n_selected_terms == len(lib.regression_.selected_features_)
    # in-sample it must beat predicting the training mean everywhere
    r_fit = np.nanmean(pearson_r(ours.predict(x), y))
    r_mean = np.nanmean(pearson_r(np.broadcast_to(y.mean(0), y.shape), y))
    assert r_fit > r_mean


@pytest.mark.parametrize(("n", "p"), [(80, 40), (60, 120)])  # fewer terms than studies, and more (square U)
def test_the_gcv_without_the_hat_matrix_gives_the_librarys_errors(n: int, p: int) -> None:
    from neuroquery import ridge
    from scipy import linalg

    from cbvae_ext.data.neuroquery import _gcv_without_hat, fast_ridge_gcv

    rng = np.random.default_rng(n)
    x, y = rng.random((n, p)) * (rng.random((n, p)) < 0.2), rng.random((n, 300))
    xp, _, yc, intercept = ridge._preprocess(x, y)
    u, s, _ = linalg.svd(xp, full_matrices=False)
    theirs = ridge._gcv(u, s, yc, intercept, ridge._DEFAULT_ALPHAS)
    np.testing.assert_allclose(_gcv_without_hat(u, s, yc, intercept, ridge._DEFAULT_ALPHAS), theirs, rtol=1e-9)
    with fast_ridge_gcv():
        fast = ridge.RidgeGCV().fit(x, y)
    assert ridge._gcv is not _gcv_without_hat  # the library's own again after the block
    plain = ridge.RidgeGCV().fit(x, y)
    assert fast.alpha_ == plain.alpha_
    np.testing.assert_allclose(fast.coef_, plain.coef_, rtol=1e-9, atol=1e-12)


def test_direction_scores_trivial_changes():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(3, 500))
    r, size = direction_scores(real * 2, real)
    np.testing.assert_allclose(r, 1.0)
    np.testing.assert_allclose(size, 2.0)
    r0, size0 = direction_scores(np.zeros_like(real), real)  # a decoder that ignores the task
    assert (r0 == 0).all() and (size0 == 0).all()
    r_rand, _ = direction_scores(rng.normal(size=real.shape), real)
    assert (np.abs(r_rand) < 0.2).all()


def test_counterfactual_section_on_a_trained_run(tiny_dataset, tiny_runs, splits):
    """On the training split (several maps per category): one switch recomputed by hand."""
    from cbvae_ext.evaluation.passes import SplitData, encode_split
    from cbvae_ext.run_folder import RunFolder

    info, full, _ = splits
    # three categories with several training maps keep the test small
    kept = [c for c in np.unique(full.categories) if c >= 0 and (full.categories == c).sum() >= 3][:3]
    rows = np.flatnonzero(np.isin(full.categories, kept))
    train = SplitData(
        [full.ids[i] for i in rows], full.maps[rows], full.meta[rows], full.meta_mask[rows],
        full.categories[rows], full.year_bin[rows], full.frame.iloc[rows].reset_index(drop=True),
    )  # fmt: skip
    mask = np.asarray(info.mask) != 0
    model = RunFolder.open(tiny_runs["cbvae"]).load_network("cpu").eval()
    mu = encode_split(model, train, mask, 16, "cpu")
    task = info.schema.group("task")
    data = EvalData(
        {"n_bootstrap": 50, "seed": 0, "n_prior_samples": 2, "n_counterfactual": 2},
        info, info.schema, mask, {}, train, train, None, mu.shape[1],
    )  # fmt: skip
    data.cache["counterfactual"] = {"model": model, "mu": mu, "imputed_defaults": None, "task": task}
    sec = counterfactual_section(data)
    res = sec.results
    counts = {c: int((train.categories == c).sum()) for c in set(train.categories.tolist()) if c >= 0}
    sources = [c for c, n in counts.items() if n >= 2]
    assert (
        len(counts) == 3
        and res["n_studies"] == 2 * len(sources)
        and res["n_changes"] == 2 * len(sources) * (len(counts) - 1)
    )
    col = sec.columns["cbvae/counterfactual/pearson_r"]
    assert np.isfinite(col).sum() == res["n_studies"] and np.nanmax(np.abs(col)) <= 1
    # recompute by hand the switch of category c's chosen studies to category t
    chosen = np.flatnonzero(np.isfinite(col))
    c = int(train.categories[chosen[0]])
    t = min(k for k in counts if k != c)
    own_rows = [int(i) for i in chosen if train.categories[i] == c]
    expect, reference = [], []
    for i in own_rows:
        meta = np.repeat(train.meta[i : i + 1], 2, axis=0)
        meta[1, task.meta_slice] = 0.0
        meta[1, task.meta_slice.start + t] = 1.0
        mm = np.repeat(train.meta_mask[i : i + 1], 2, axis=0)
        mm[:, task.mask_index] = 1.0
        with torch.no_grad():
            m = model.decoder_input(torch.from_numpy(meta), torch.from_numpy(mm), None)
            gen = masked_vectors(torch.sigmoid(model.decode(torch.from_numpy(mu[[i, i]]), m)).numpy(), mask)
        own = (train.maps[train.categories == c].sum(0) - train.maps[i]) / (counts[c] - 1)
        real = train.maps[train.categories == t].mean(0) - own
        expect.append(pearson_r((gen[1] - gen[0])[None], real[None])[0])
        # the literature's reference: the training means' difference (here the split is its own training set)
        literature = train.maps[train.categories == t].mean(0) - train.maps[train.categories == c].mean(0)
        reference.append(pearson_r(literature[None], real[None])[0])
    got = res["pairs"][f"{info.schema.categories[c]} -> {info.schema.categories[t]}"]
    assert got["n_studies"] == len(own_rows) == 2
    assert got["generated_median_r"] == pytest.approx(float(np.median(expect)), abs=1e-4)
    assert got["training_category_means_median_r"] == pytest.approx(float(np.median(reference)), abs=1e-6)
    assert 0 < res["training_category_means"]["median_r"] <= 1
    assert set(res["against_training_means"]) == {"rule", "generated", "conditional_mean"}
    crit = res["criteria"]["counterfactual_direction"]
    assert crit["value"] == res["generated"]["median_r"] and crit["passed"] == (crit["value"] >= 0.5)
