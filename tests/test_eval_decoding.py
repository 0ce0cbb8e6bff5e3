"""Bayesian decoding and quality control: the decoder's math, the AUC, both sections on a tiny run, the study report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cbvae_ext.evaluation.columns import CORRELATION_DECODER, TOP5, column
from cbvae_ext.evaluation.decoding import (
    Candidates,
    candidate_loglik,
    category_candidates,
    decoding_section,
    posterior,
)
from cbvae_ext.evaluation.quality_control import CORRUPTIONS, corrupt, paired_auc, quality_control_section, roc_auc
from cbvae_ext.evaluation.section import EvalData
from cbvae_ext.folders import json_safe

SHAPE = (3, 4, 5)


class _TemplateNet(torch.nn.Module):
    """A decoder whose map is the template of the category in ``m`` (the latent is ignored)."""

    latent_size = 2

    def __init__(self, templates: torch.Tensor) -> None:
        super().__init__()
        self.templates = templates  # [C, V] probabilities

    def encode(self, x, meta, meta_mask):
        return torch.zeros(len(x), 2), torch.zeros(len(x), 2)

    def decoder_input(self, meta, meta_mask, imp_mu):
        return torch.cat([meta, meta_mask], 1)

    def decode(self, z, m):
        p = (m[:, : len(self.templates)] @ self.templates).clamp(1e-4, 1 - 1e-4)
        return torch.logit(p).view(len(z), 1, *SHAPE)


def _candidates(n: int, v: int) -> Candidates:
    meta = np.eye(n, dtype=np.float32)
    return Candidates("category", [f"c{i}" for i in range(n)], meta, np.ones((n, 1), np.float32), np.log(np.full(n, 1 / n)),
                      np.zeros((n, v), np.float32))  # fmt: skip


def test_a_categorys_own_mean_decodes_to_it_and_the_posterior_sums_to_one():
    rng = np.random.default_rng(0)
    v = int(np.prod(SHAPE))
    templates = rng.uniform(0.05, 0.95, size=(4, v)).astype(np.float32)
    net = _TemplateNet(torch.from_numpy(templates))
    maps = templates.reshape(4, *SHAPE)  # each map is exactly one category's conditional mean
    cands = _candidates(4, v)
    ll = candidate_loglik(net, maps, np.arange(v), cands, None, k=3, seed=1)
    post = posterior(ll, cands.log_prior)
    assert np.allclose(post.sum(axis=1), 1.0)
    assert (post.argmax(axis=1) == np.arange(4)).all()
    # the bound is exact here (z is ignored): log p(x | c) = -BCE(x, template_c)
    x, p = templates[0].astype(np.float64), templates[1].astype(np.float64)
    assert ll[0, 1] == pytest.approx(float((x * np.log(p) + (1 - x) * np.log1p(-p)).sum()), rel=1e-4)
    # a prior strong enough overturns the likelihood: the posterior reads both
    skewed = posterior(ll, np.array([0.0, 0.0, 0.0, 1e6]))
    assert (skewed.argmax(axis=1) == 3).all()


def test_roc_auc_of_separable_and_identical_copies():
    rng = np.random.default_rng(0)
    clean = rng.normal(size=50)
    assert roc_auc(clean, clean - 100) == 1.0
    assert roc_auc(clean, clean + 100) == 0.0
    same = paired_auc(clean, clean.copy(), 200, 0)
    assert same["auc"] == 0.5 and same["ci95"] == [0.5, 0.5]
    noisy = paired_auc(clean, clean - 0.5 + rng.normal(size=50), 200, 0)
    assert noisy["ci95"][0] < noisy["auc"] < noisy["ci95"][1]


def test_corruptions_move_peaks_as_named():
    rng = np.random.default_rng(0)
    xyz = np.array([[30.0, -20.0, 40.0], [-10.0, 50.0, 0.0]])
    assert np.array_equal(corrupt(xyz, "flip_x", rng, xyz), xyz * [-1, 1, 1])
    assert np.allclose(np.linalg.norm(corrupt(xyz, "shift_10mm", rng, xyz) - xyz, axis=1), 10.0)
    inside = np.array([[0.0, 0.0, 0.0], [4.0, 4.0, 4.0]])
    assert set(map(tuple, corrupt(xyz, "random", rng, inside))) <= set(map(tuple, inside))
    assert not np.allclose(corrupt(xyz, "tal_as_mni", rng, xyz), xyz)


@pytest.fixture(scope="module")
def eval_data(tiny_dataset: Path, tiny_runs: dict[str, Path]) -> EvalData:
    from cbvae_ext.data import load_dataset_info
    from cbvae_ext.evaluation.passes import load_split
    from cbvae_ext.evaluation.workflow import load_run

    info = load_dataset_info(tiny_dataset)
    mask = np.asarray(info.mask) != 0
    run = load_run(tiny_runs["cbvae"], info.schema, mask.shape)
    train, test = load_split(info, info.rows("train")), load_split(info, info.rows("test"))
    opts = {"n_bootstrap": 200, "seed": 0, "decoding_k": 2, "decoding_n_terms": 8, "decoding_max_maps": 6,
            "qc_k": 2, "qc_max_maps": 8}  # fmt: skip
    data = EvalData(opts, info, info.schema, mask, {"cbvae": run}, train, test, None, run.latent_size)
    imp0 = run.imputed_defaults
    data.cache["counterfactual"] = {"model": run.model, "imputed_defaults": imp0}
    return data


def test_decoding_section_on_a_tiny_run(eval_data: EvalData):
    sec = decoding_section(eval_data)
    res = json.loads(json.dumps(json_safe(sec.results), allow_nan=False))
    cats = res["categories"]
    n_c = cats["n_candidates"]
    assert cats["chance"] == {"top1": 1 / n_c, "top5": min(1.0, 5 / n_c)}
    for who in ("model", "correlation_decoder"):
        for m in ("top1", "top5"):
            assert 0.0 <= cats[who][m]["mean"] <= 1.0 and cats[who][m]["n"] == 6
    assert cats[who]["top1"]["mean"] <= cats[who]["top5"]["mean"]
    assert math.isfinite(cats["paired"]["top5"]["mean_diff"])
    for row in cats["examples"]:
        assert sum(t["posterior"] for t in row["top"]) <= 1.0 + 1e-9
    terms = res["terms"]
    assert terms["n_candidates"] == 8 and 0.0 <= terms["model"]["mean"] <= 1.0
    assert terms["chance"] == pytest.approx(min(10, 8) / 8)
    crit = res["criteria"]
    assert set(crit) == {
        "decoding_top5_at_least_correlation_decoder",
        "decoding_term_recall_at_least_correlation_decoder",
    }
    assert all(isinstance(c["passed"], bool) for c in crit.values())
    col = sec.columns[column(CORRELATION_DECODER, TOP5)]
    assert len(col) == eval_data.test.n and np.isfinite(col[:6]).all() and np.isnan(col[6:]).all()
    assert crit["decoding_top5_at_least_correlation_decoder"]["mean_b"] == pytest.approx(np.nanmean(col))


def test_category_candidates_are_the_training_means(eval_data: EvalData):
    tr = eval_data.train
    cands = category_candidates(eval_data.schema, tr.categories, tr.maps)
    c = eval_data.schema.category_index(cands.names[0])
    assert np.allclose(cands.maps[0], tr.maps[tr.categories == c].mean(axis=0), atol=1e-6)
    assert np.exp(cands.log_prior).sum() == pytest.approx(1.0)


def test_quality_control_section_on_a_tiny_run(eval_data: EvalData):
    sec = quality_control_section(eval_data)
    res = json.loads(json.dumps(json_safe(sec.results), allow_nan=False))
    assert res["n_maps"] == 8 and res["clean_vs_stored_r"]["mean"] > 0.99  # the clean copy is the stored map
    for kind in CORRUPTIONS:
        out = res["corruptions"][kind]
        assert 0.0 <= out["ci95"][0] <= out["auc"] <= out["ci95"][1] <= 1.0
        assert out["same_map"] < 8
        # the criterion reads the default score (peak density); the ELBO score is reported beside it
        assert res["score"] == "peak_density" and set(out["auc_by_score"]) == {"peak_density", "elbo"}
        assert out["auc_by_score"]["peak_density"] == out["auc"] and 0.0 <= out["clean_wins_paired"] <= 1.0
        assert out["n_peaks_outside_mask"] >= 0
    assert res["corruptions"]["random"]["n_peaks_outside_mask"] == 0  # drawn from the in-mask voxels
    assert res["corruptions"]["flip_x"]["nearly_symmetric"]["n"] >= 0
    assert set(res["criteria"]) == {
        "qc_auc_flip_x_at_least_0_9",
        "qc_auc_random_at_least_0_9",
        "qc_auc_tal_at_least_0_7",
        "qc_auc_shift_at_least_0_7",
    }
    assert np.isfinite(sec.columns["cbvae/qc/score_clean"][:8]).all()


def test_the_study_report_decodes(tmp_path: Path, tiny_dataset: Path, tiny_runs: dict[str, Path]):
    from cbvae_ext.study import StudyContext, analyse_file

    context = StudyContext.open(tiny_runs["cbvae"], tiny_dataset, k=2, cache=False, n_terms=6)
    path = tmp_path / "peaks.csv"
    path.write_text("x,y,z\n-42,-60,-10\n40,-58,-12\n0,20,44\n")
    report = analyse_file(path, context=context, space="MNI", readings=False).reports[0]
    dec = report["decoding"]
    assert dec["rule"].startswith("log p(x | c)")
    assert 0 < len(dec["categories"]) <= 5 and len(dec["terms"]) == 5 and dec["term_candidates"] == 6
    probs = [c["posterior"] for c in dec["categories"]]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-9
    assert all(math.isfinite(c["loglik_nats"]) for c in dec["categories"] + dec["terms"])
