"""The evaluation's sections one by one: each reads only ``EvalData`` and ``data.cache``, returns its columns.

The summary sections on hand-made per-map tables (their numbers by hand), then the sections that fit or run
networks on the session's tiny trained run, in the workflow's order, with the cache keys each writer documents.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse
import torch

from cbvae_ext.evaluation.baselines import baselines_section, pca_dims
from cbvae_ext.evaluation.columns import (
    CATEGORY_MEAN,
    CONSTANT_MAP,
    DATA_CEILING,
    ENTROPY_FLOOR,
    LOGLIK,
    LOGLIK_ELBO,
    LOGLIK_IWAE,
    MEAN_MAP,
    MODEL,
    MODEL_COND,
    NEAREST_TRAIN_R,
    PEARSON_R,
    SSIM,
    TOPIC_RIDGE,
    UNCOND,
    column,
    hidden,
    pca,
    probe,
    recon,
)
from cbvae_ext.evaluation.conditional import conditional_maps_section
from cbvae_ext.evaluation.criteria import evaluate_criteria
from cbvae_ext.evaluation.debiasing import debiasing_section
from cbvae_ext.evaluation.duplicates import duplicates_section
from cbvae_ext.evaluation.ood import OOD_TABLE, ood_section
from cbvae_ext.evaluation.reconstruction import (
    likelihood_section,
    missing_conditions_section,
    models_section,
    pca_equivalent_section,
    ssim_section,
)
from cbvae_ext.evaluation.section import EvalData, Section
from cbvae_ext.evaluation.stats import bootstrap_summary, paired_bootstrap
from cbvae_ext.evaluation.text_protocols import neuroquery_section
from cbvae_ext.evaluation.unseen_pairs import choose_pairs, unseen_pairs_section
from cbvae_ext.evaluation.workflow import SECTIONS
from cbvae_ext.folders import json_safe

N_BOOT = 50


def _table_data(columns: dict[str, np.ndarray], runs: dict | None = None, **cache) -> EvalData:
    """EvalData around a hand-made per-map table (no dataset: the summary sections read only the table)."""
    n = len(next(iter(columns.values())))
    test = SimpleNamespace(n=n)
    data = EvalData({"n_bootstrap": N_BOOT, "seed": 0, "iwae_k": 4}, None, None, None, runs or {}, None, test, None, 8)
    data.cache.update(columns=columns, **cache)
    return data


def test_likelihood_section_excess_is_minus_loglik_minus_the_floor():
    rng = np.random.default_rng(0)
    floor = rng.uniform(10, 20, 30)
    cols = {
        ENTROPY_FLOOR: floor,
        column(MODEL, LOGLIK_IWAE): -floor - 5.0,
        column(MODEL, LOGLIK_ELBO): -floor - 7.0,
        column(MEAN_MAP, LOGLIK): -floor - 9.0,
        column(CATEGORY_MEAN, LOGLIK): -floor - 8.0,
    }
    sec = likelihood_section(_table_data(cols))
    assert sec.name == "likelihood" and not sec.columns
    rows = sec.results["models"]
    assert list(rows) == [MODEL, MEAN_MAP, CATEGORY_MEAN]  # roles without a bound (uncond, ...) are left out
    assert rows[MODEL]["excess_nll_iwae"]["mean"] == pytest.approx(5.0)
    assert rows[MODEL]["excess_nll_elbo"]["mean"] == pytest.approx(7.0)
    assert rows[MODEL]["bounds"] == "log p(x | m)" and rows[MODEL]["bound"].startswith("IWAE, k = 4")
    assert rows[MEAN_MAP]["excess_nll"]["mean"] == pytest.approx(9.0)
    assert rows[CATEGORY_MEAN]["bounds"] == "log p(x | category)"
    assert sec.results["entropy_floor"] == bootstrap_summary(floor, N_BOOT, 0)


def test_ssim_section_reports_the_columns_there_are():
    values = np.linspace(0.1, 0.9, 12)
    cols = {recon(MODEL, SSIM): values, column(CONSTANT_MAP, SSIM): values / 2}
    res = ssim_section(_table_data(cols)).results
    assert res["criterion"] is False
    assert set(res) == {"criterion", "params", MODEL, CONSTANT_MAP}  # no pca_8 / mean_map SSIM column
    assert res[CONSTANT_MAP] == bootstrap_summary(values / 2, N_BOOT, 0)


def test_pca_equivalent_section_interpolates_the_components_in_log2():
    dims = [8, 16, 32]
    cols = {recon(MODEL, m): np.full(10, 0.5) for m in ("pearson_r", "dice_top5", "dice_top1")}
    for d, v in zip(dims, (0.4, 0.6, 0.8), strict=True):
        cols.update({column(pca(d), m): np.full(10, v) for m in ("pearson_r", "dice_top5", "dice_top1")})
    res = pca_equivalent_section(_table_data(cols, {MODEL: object()}, pca_dims=dims)).results
    assert res["dims"] == dims
    assert res[PEARSON_R]["pca"] == pytest.approx([0.4, 0.6, 0.8])
    assert res[PEARSON_R]["components"] == pytest.approx(2**3.5)  # halfway between 8 and 16 in log2
    assert pca_equivalent_section(_table_data(cols, pca_dims=dims)).results == {"absent": "no --run_dir given"}


def test_duplicates_section_writes_the_nearest_r_and_drops_duplicates_from_the_model_r():
    rng = np.random.default_rng(1)
    train = rng.random((20, 50)).astype(np.float32)
    test = rng.random((4, 50)).astype(np.float32)
    test[2] = train[7]  # an exact duplicate
    model_r = np.array([0.1, 0.2, 0.9, 0.3])
    data = _table_data({recon(MODEL, PEARSON_R): model_r})
    data.train = SimpleNamespace(maps=train, ids=[f"tr{i}" for i in range(20)], n=20)
    data.test = SimpleNamespace(maps=test, ids=[f"te{i}" for i in range(4)], n=4)
    sec = duplicates_section(data)
    assert list(sec.columns) == [NEAREST_TRAIN_R] and sec.columns[NEAREST_TRAIN_R][2] == pytest.approx(1.0)
    assert (sec.columns[NEAREST_TRAIN_R][[0, 1, 3]] < 0.99).all()
    assert sec.results["searched_train_maps"] == 20
    assert sec.results["cbvae_r_without_near_duplicates"]["mean"] == pytest.approx(0.2)  # the 0.9 map left out
    assert "nearest_r" not in sec.results  # per map: in the table, not the JSON


# ----- on the tiny trained run, in the workflow's order ----------------------------------------------------
OPTS = {
    "n_bootstrap": N_BOOT, "seed": 0, "batch_size": 16, "iwae_k": 2, "iwae_max_maps": None, "n_prior_samples": 2,
    "n_examples": 2, "n_permutations": 2, "n_permutations_mlp": 2, "n_unseen_pairs": 2,
}  # fmt: skip


@pytest.fixture(scope="module")
def ran(tiny_dataset: Path, tiny_runs: dict[str, Path]) -> tuple[EvalData, dict[str, Section]]:
    """The sections that fit or run networks, run as the workflow runs them (columns joined after each)."""
    from cbvae_ext.data import load_dataset_info
    from cbvae_ext.evaluation.passes import load_split, peak_indicator
    from cbvae_ext.evaluation.workflow import load_run

    info = load_dataset_info(tiny_dataset)
    mask = np.asarray(info.mask) != 0
    run = load_run(tiny_runs["cbvae"], info.schema, mask.shape)
    train, test = load_split(info, info.rows("train")), load_split(info, info.rows("test"))
    peaks, _ = peak_indicator(info, test.maps)
    data = EvalData(dict(OPTS), info, info.schema, mask, {MODEL: run}, train, test, peaks, run.latent_size)
    columns: dict[str, np.ndarray] = {ENTROPY_FLOOR: np.zeros(test.n)}
    data.cache.update(columns=columns, predictions={})
    data.cache["fitted_path"] = {k: v.clone() for k, v in run.model.cond_mean.state_dict().items()}
    out: dict[str, Section] = {}
    for fn in (
        baselines_section,
        models_section,
        neuroquery_section,
        unseen_pairs_section,
        conditional_maps_section,
        debiasing_section,
        missing_conditions_section,
        functools.partial(ood_section, path=tiny_dataset),
    ):
        before = dict(columns)
        sec = fn(data)
        assert columns == before  # a section returns its columns; it never writes the table itself
        columns.update({k: np.asarray(v, np.float64) for k, v in sec.columns.items()})
        out[sec.name] = sec
    return data, out


def test_each_section_is_json_and_named_as_in_the_workflow(ran):
    _, sections = ran
    names = [name for name, _ in SECTIONS] + ["ood"]
    for name, sec in sections.items():
        assert name in names
        json.dumps(json_safe(sec.results), allow_nan=False)


def test_baselines_section_writes_the_documented_cache_keys(ran):
    data, sections = ran
    dims = pca_dims(data.latent_size, data.train.n, data.train.maps.shape[1])
    assert data.cache["pca_dims"] == dims and data.cache["pca"].n_components == max(dims)
    means = data.cache["category_mean"].means
    assert all(m.shape == (data.train.maps.shape[1],) for m in means.values())
    assert {MEAN_MAP, CATEGORY_MEAN, TOPIC_RIDGE, MODEL_COND} <= set(data.cache["predictions"])
    cols = sections["baselines"].columns
    assert column(pca(data.latent_size), SSIM) in cols and column(pca(2 * data.latent_size), SSIM) not in cols
    res = sections["baselines"].results
    assert [row["n_components"] for row in res["pca_curve"]] == dims
    assert res[MEAN_MAP][PEARSON_R] == bootstrap_summary(cols[column(MEAN_MAP, PEARSON_R)], N_BOOT, 0)


def test_models_section_columns_and_cache(ran):
    data, sections = ran
    sec = sections["models"]
    assert sec.results[UNCOND] == {"absent": "no --uncond_run_dir given"}
    cols = sec.columns
    for name in (recon(MODEL, PEARSON_R), column(MODEL_COND, PEARSON_R), column(MODEL, LOGLIK_IWAE)):
        assert cols[name].shape == (data.test.n,)
    assert all(column(column(MODEL, hidden(g.name)), PEARSON_R) in cols for g in data.schema.groups)
    cb = sec.results[MODEL]
    assert cb["reconstruction"][PEARSON_R] == bootstrap_summary(cols[recon(MODEL, PEARSON_R)], N_BOOT, 0)
    scores = data.cache["scores"][MODEL]
    assert scores["mu"].shape == (data.test.n, data.latent_size)
    assert set(data.cache["counterfactual"]) == {"model", "mu", "imputed_defaults", "task"}
    assert callable(data.cache["title_model"])  # the tiny dataset has topic weights


def test_the_criteria_read_the_columns_the_sections_write(ran):
    import pandas as pd

    data, _ = ran
    table = pd.DataFrame(data.cache["columns"])
    crit = evaluate_criteria(table, data.latent_size, N_BOOT, 0)
    a, b = table[recon(MODEL, PEARSON_R)].to_numpy(), table[column(pca(data.latent_size), PEARSON_R)].to_numpy()
    assert crit["r_above_pca"]["mean_diff"] == paired_bootstrap(a, b, "greater", N_BOOT, 0)["mean_diff"]
    for name in ("cond_only_r_above_category_mean", "all_hidden_within_0.03", "iwae_above_category_mean"):
        assert crit[name]["passed"] is not None, name
    assert crit["logistic_probe_below_nolambda"]["passed"] is None  # no λ = 0 twin given


def test_debiasing_and_missing_conditions(ran):
    data, sections = ran
    cols = sections["debiasing"].columns
    assert set(cols) <= {column(c, probe(k)) for c in (MODEL, DATA_CEILING) for k in ("logistic", "mlp")}
    assert column(DATA_CEILING, probe("logistic")) in cols
    assert sections["debiasing"].results["paired_vs_nolambda"] == {"absent": "no --nolambda_run_dir given"}
    missing = sections["missing_conditions"].results
    assert set(missing) >= {g.name for g in data.schema.groups} | {"all", "rule", "imputed_spread"}
    hidden_all = data.cache["columns"][column(column(MODEL, hidden("all")), PEARSON_R)]
    assert missing["all"][PEARSON_R]["hidden"] == bootstrap_summary(hidden_all, N_BOOT, 0)


def test_conditional_maps_and_ood(ran):
    data, sections = ran
    cm = sections["conditional_maps"]
    generated, heldout, training, labels = cm.figure_data["category_maps"]
    assert generated.shape == heldout.shape == training.shape == (len(labels), data.train.maps.shape[1])
    assert cm.results["categories"]["model"]["labels"] == labels
    ood = sections["ood"]
    assert not ood.columns and list(ood.tables) == [OOD_TABLE]
    table = ood.tables[OOD_TABLE]
    assert len(table["id"]) == ood.results["n_maps"] == len(table[recon(MODEL, PEARSON_R)])
    assert column(CATEGORY_MEAN, PEARSON_R) in table and column(MEAN_MAP, PEARSON_R) in table


def test_a_section_draws_the_same_numbers_whatever_ran_before_it(ran, tiny_dataset):
    """Each section seeds its own stream: rerun after every other section, the sampled columns (IWAE, prior
    draws) are the same as the first time (one shared stream would have moved on)."""
    data, sections = ran
    again = models_section(data)
    first = sections["models"].columns
    assert column(MODEL, LOGLIK_IWAE) in first
    for name, values in first.items():
        np.testing.assert_array_equal(np.asarray(again.columns[name], np.float64), values, err_msg=name)
    ood = ood_section(data, path=tiny_dataset).tables[OOD_TABLE]
    for name, values in sections["ood"].tables[OOD_TABLE].items():
        assert list(ood[name]) == list(values), name


def test_choose_pairs_keeps_the_band_distinct_terms_and_no_shared_word():
    # 6 terms over 50 studies; co-occurrence of (0, 1) 10, (2, 3) 10, (1, 3) 20, (4, 5) 10 ("memory" in both)
    vocabulary = ["pain", "insula", "reward", "striatum", "working memory", "memory"]
    x = np.zeros((50, 6), np.int8)
    x[:10, [0, 1]] = 1
    x[10:20, [2, 3]] = 1
    x[20:40, [1, 3]] = 1
    x[40:50, [4, 5]] = 1
    present = scipy.sparse.csc_matrix(x)
    eligible = np.ones(6, bool)
    pairs = choose_pairs(present, vocabulary, eligible, (5, 12), 10, np.random.default_rng(0))
    assert sorted((vocabulary[a], vocabulary[b], n) for a, b, n in pairs) == [
        ("pain", "insula", 10),
        ("reward", "striatum", 10),
    ]  # (1, 3): 20 studies, above the band; (4, 5): a shared word
    assert choose_pairs(present, vocabulary, eligible, (5, 12), 1, np.random.default_rng(0)) == pairs[:1]
    # a term in more studies than max_count is left out ("insula" and "striatum" are in 30)
    assert choose_pairs(present, vocabulary, eligible, (5, 12), 10, np.random.default_rng(0), max_count=20) == []
    eligible[1] = False  # "insula" unreadable by one predictor
    assert [
        vocabulary[a] for a, _, _ in choose_pairs(present, vocabulary, eligible, (5, 12), 10, np.random.default_rng(0))
    ] == ["reward"]


def test_unseen_pairs_remove_the_pair_refit_and_restore_the_path(ran):
    from cbvae_ext.evaluation.metrics import pearson_r

    data, sections = ran
    res = sections["unseen_pairs"].results
    assert "absent" not in res, res
    terms = data.cache["neuroquery"]["terms"]
    row_of = {str(i): k for k, i in enumerate(data.info.metadata["id"])}
    rows = np.array([row_of[i] for i in data.train.ids])
    low, high = res["band"]["studies"]
    for pair in res["pairs"]:
        a, b = (terms.vocabulary.index(t) for t in pair["terms"])
        both = (terms.tfidf[rows][:, a].toarray().ravel() > 0) & (terms.tfidf[rows][:, b].toarray().ravel() > 0)
        both &= terms.observed[rows]
        assert pair["n_removed"] == both.sum() == pair["n_cooccur_with_text"] and low <= both.sum() <= high
        target = data.train.maps[both].mean(0)
        mean_map = pearson_r(data.train.maps[~both].mean(0)[None], target[None])[0]
        assert pair["mean_map"] == pytest.approx(mean_map, abs=1e-6)
        assert all(-1 <= pair[k] <= 1 for k in ("cbvae", "neuroquery", "cbvae_seen", "neuroquery_seen"))
        assert set(pair["specific"]) == {"cbvae", "neuroquery", "cbvae_seen", "neuroquery_seen"}
    assert res["n_pairs"] == len(res["pairs"]) <= OPTS["n_unseen_pairs"]
    assert {"unseen_pairs_above_neuroquery", "unseen_pairs_specific_above_neuroquery"} == set(res["criteria"])
    # the run's own path is back as fitted (the later sections read it)
    for name, value in data.runs[MODEL].model.cond_mean.state_dict().items():
        assert torch.equal(value, data.cache["fitted_path"][name]), name


def test_unseen_pairs_say_why_they_are_absent():
    data = _table_data({"id": np.arange(3)})
    data.opts["n_unseen_pairs"] = 0
    off = unseen_pairs_section(data)
    assert off.results == {"absent": "switched off (--n_unseen_pairs 0)"}
    data.opts["n_unseen_pairs"] = 2  # but no NeuroQuery fit and no run
    assert "needs the NeuroQuery baseline" in unseen_pairs_section(data).results["absent"]
