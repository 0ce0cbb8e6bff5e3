"""The generative measurements (completion, joint peak likelihood, calibration): their pure parts against exact
answers, and the three sections on the session's tiny trained run with small options."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cbvae_ext.evaluation.baselines import PCABaseline
from cbvae_ext.evaluation.columns import (
    CALIBRATION_BRIER,
    COMPLETION_AUC,
    COMPLETION_R,
    HALF_MAP,
    JOINT_PEAK_LOGLIK,
    MEAN_MAP,
    MODEL,
    MODEL_COND,
    PCA_COMPLETION,
    PEAK_RATE,
    column,
)
from cbvae_ext.evaluation.criteria import PAIRED_CRITERIA
from cbvae_ext.evaluation.generative import (
    _kernel_cube,
    calibration_section,
    completion_section,
    expected_calibration_error,
    generative_criteria,
    independent_peak_log_likelihood,
    joint_likelihood_section,
    joint_peak_log_likelihood,
    render_peak_maps,
    split_peaks,
)
from cbvae_ext.evaluation.metrics import peak_auc
from cbvae_ext.evaluation.section import EvalData
from cbvae_ext.evaluation.text_protocols import density

OPTS = {
    "n_bootstrap": 200,
    "seed": 0,
    "batch_size": 16,
    "n_prior_samples": 2,
    "n_half_splits": 2,
    "joint_k": 3,
    "n_calibration_samples": 3,
    "generative_max_maps": 12,
}


# ----- pure parts -----------------------------------------------------------------------------------------
def test_half_split_is_seeded_disjoint_and_complete():
    voxels = np.array([5, 90, 17, 33, 2, 71, 8])
    a, b = split_peaks(voxels, np.random.default_rng(3))
    a2, b2 = split_peaks(voxels, np.random.default_rng(3))
    assert np.array_equal(a, a2) and np.array_equal(b, b2)  # same seed, same halves
    assert len(a) == 3 and len(b) == 4 and not set(a) & set(b) and set(a) | set(b) == set(voxels)
    others = {tuple(split_peaks(voxels, np.random.default_rng(s))[0]) for s in range(20)}
    assert len(others) > 1  # the split is random across seeds
    with pytest.raises(ValueError, match="at least 2 peak voxels"):
        split_peaks(np.array([4]), np.random.default_rng(0))


def test_peak_auc_leaves_excluded_voxels_out():
    pred = np.array([[0.9, 0.8, 0.1, 0.7, 0.2, 0.0]])
    pos = np.array([[False, False, False, True, False, False]])
    given = np.array([[True, True, False, False, False, False]])
    # voxel 3 (0.7) against 2, 4, 5 only: above all three
    assert peak_auc(pred, pos, exclude=given)[0] == pytest.approx(1.0)
    assert peak_auc(pred, pos)[0] == pytest.approx(3 / 5)  # the given voxels would count as outranking negatives
    # the same as scoring the kept voxels alone
    keep = ~given[0]
    assert peak_auc(pred, pos, exclude=given)[0] == pytest.approx(peak_auc(pred[:, keep], pos[:, keep])[0])


def test_joint_likelihood_is_the_sum_of_peak_log_densities_when_the_decoder_ignores_z():
    rng = np.random.default_rng(0)
    fixed = rng.random((4, 50)).astype(np.float32)
    peaks = rng.random((4, 50)) < 0.2
    peaks[:, 0] = True
    expected = np.where(peaks, np.log(density(fixed)), 0.0).sum(axis=1)
    np.testing.assert_allclose(independent_peak_log_likelihood(fixed, peaks), expected)
    zero = torch.zeros(4, 3)
    got = joint_peak_log_likelihood(lambda z: fixed, peaks, zero, zero, 5, torch.Generator().manual_seed(0))
    np.testing.assert_allclose(got, expected, rtol=1e-6)  # prior proposal: every weight is p(peaks)
    # a decoder that uses z: peaks that co-vary with z gain over their independent (averaged-map) likelihood
    maps = np.stack([np.r_[np.full(25, 1.0), np.zeros(25)], np.r_[np.zeros(25), np.full(25, 1.0)]])
    together = np.zeros((1, 50), bool)
    together[0, :5] = True  # five peaks all on the same side
    joint = joint_peak_log_likelihood(
        lambda z: maps[(z[:, 0] > 0).long().numpy()], together, torch.zeros(1, 1), torch.zeros(1, 1), 256,
        torch.Generator().manual_seed(1),
    )  # fmt: skip
    assert joint[0] > independent_peak_log_likelihood(maps.mean(axis=0, keepdims=True), together)[0] + 2.0


def test_ece_of_calibrated_and_miscalibrated_predictors():
    rng = np.random.default_rng(0)
    p = rng.random(200_000)
    y = rng.random(p.size) < p
    ece, bins = expected_calibration_error(p, y)
    assert ece < 0.01 and len(bins) == 10 and sum(b["n"] for b in bins) == p.size
    assert all(abs(b["mean_predicted"] - b["observed_frequency"]) < 0.02 for b in bins)
    over, _ = expected_calibration_error(np.clip(p * 1.5, 0, 1), y)  # overconfident
    assert over > 0.1
    const, _ = expected_calibration_error(np.full(p.size, y.mean()), y)  # the base rate: calibrated, uninformative
    assert const < 0.01


# ----- on the tiny trained run ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tiny_dataset, tiny_runs):
    from cbvae_ext.data import load_dataset_info
    from cbvae_ext.evaluation.passes import load_split, peak_indicator
    from cbvae_ext.run_folder import RunFolder

    info = load_dataset_info(tiny_dataset)
    train, test = load_split(info, info.rows("train")), load_split(info, info.rows("test"))
    peaks, _ = peak_indicator(info, test.maps)
    mask = np.asarray(info.mask) != 0
    model = RunFolder.open(tiny_runs["cbvae"]).load_network("cpu").eval()
    ev = EvalData(dict(OPTS), info, info.schema, mask, {}, train, test, peaks, int(model.latent_size))
    ev.cache["counterfactual"] = {"model": model, "mu": None, "imputed_defaults": None, "task": None}
    ev.cache["pca"] = PCABaseline(ev.latent_size).fit(train.maps)  # as the workflow's baselines step leaves it
    return ev


def test_rendered_peaks_give_back_the_stored_maps(data):
    """The completion's renderer reads the dataset's kernel right: a study's full peak set is its stored map."""
    cube = _kernel_cube(data.info)
    rows = np.arange(3)
    maps = render_peak_maps(cube, data.mask, [np.flatnonzero(data.peaks[i]) for i in rows])
    np.testing.assert_allclose(maps, data.test.maps[rows], atol=2e-3)  # float16 storage


def test_completion_section(data):
    sec = completion_section(data)
    res = sec.results
    n = min(OPTS["generative_max_maps"], int((data.peaks.sum(axis=1) >= 2).sum()))
    assert res["n_studies"] == n > 0 and res["n_half_splits"] == 2
    for p in (MODEL, MODEL_COND, HALF_MAP, PCA_COMPLETION, MEAN_MAP):
        auc, r = sec.columns[column(p, COMPLETION_AUC)], sec.columns[column(p, COMPLETION_R)]
        assert np.isfinite(auc).sum() == n and np.nanmin(auc) >= 0 and np.nanmax(auc) <= 1
        assert np.isfinite(r).sum() == n and np.nanmax(np.abs(r)) <= 1
    assert set(res["model_vs"]) == {MODEL_COND, HALF_MAP, PCA_COMPLETION, MEAN_MAP}
    paired = res["model_vs"][HALF_MAP][COMPLETION_AUC]
    assert paired["n"] == n and paired["ci95"][0] <= paired["mean_diff"] <= paired["ci95"][1]
    # the given half's own map ranks the held-out half far above chance (neighbouring peaks), the mean map too
    assert np.nanmean(sec.columns[column(HALF_MAP, COMPLETION_AUC)]) > 0.55
    assert np.nanmean(sec.columns[column(MEAN_MAP, COMPLETION_AUC)]) > 0.5
    again = completion_section(data)  # seeded
    np.testing.assert_array_equal(
        again.columns[column(MODEL, COMPLETION_AUC)], sec.columns[column(MODEL, COMPLETION_AUC)]
    )
    assert {"completion_auc_above_conditions", "completion_auc_above_half", "completion_auc_above_pca"} <= set(
        PAIRED_CRITERIA
    )


def test_joint_likelihood_section(data):
    sec = joint_likelihood_section(data)
    res = sec.results
    joint, cond = sec.columns[column(MODEL, JOINT_PEAK_LOGLIK)], sec.columns[column(MODEL_COND, JOINT_PEAK_LOGLIK)]
    ok = np.isfinite(joint)
    assert ok.sum() == res["n_studies"] == OPTS["generative_max_maps"]
    assert np.isfinite(cond[ok]).all() and (joint[ok] < 0).all() and (cond[ok] < 0).all()
    # a peak voxel is one of V: its log density is near -log V for a flat map, bounded by the density floor
    v = data.mask.sum()
    per_peak = joint[ok] / data.peaks[ok].sum(axis=1)
    assert (per_peak > np.log(0.01 / v)).all() and (per_peak < 0).all()
    gain = res["gain_per_study"]["vs_conditional_mean"]
    assert gain["n"] == ok.sum() and gain["mean_diff"] == pytest.approx(float(np.mean(joint[ok] - cond[ok])))
    assert {"vs_conditional_mean", "vs_training_mean"} <= set(res["gain_per_peak"])
    assert res["joint_k"] == OPTS["joint_k"] and "joint_likelihood_above_cond_mean" in PAIRED_CRITERIA


def test_calibration_section_and_its_figure(data, tmp_path):
    from cbvae_ext.evaluation.figures import plot_reliability

    sec = calibration_section(data)
    res = sec.results
    assert res["n_studies"] == OPTS["generative_max_maps"] and 0 < res["event_rate_test"] < 1
    assert res["ece_of_zero"] == res["event_rate_test"]  # the bar: predicting 0 everywhere
    for p in (MODEL, MODEL_COND, PEAK_RATE):
        pr = res["predictors"][p]
        assert 0 <= pr["ece"] <= 1 and sum(b["n"] for b in pr["bins"]) == res["n_studies"] * data.mask.sum()
        brier = sec.columns[column(p, CALIBRATION_BRIER)]
        assert np.isfinite(brier).sum() == res["n_studies"] and np.nanmax(brier) <= 1
    crit = generative_criteria({"calibration": res})["ece_below_0_01"]
    ece = res["predictors"][MODEL]["ece"]
    assert crit["passed"] == (ece <= 0.01 and ece < res["ece_of_zero"])
    # a model whose draws never reach the event predicts 0 everywhere: below 0.01 when events are rare, not passed
    zero = {**res, "predictors": {MODEL: {"ece": res["ece_of_zero"]}}}
    assert res["ece_of_zero"] < 0.01 and generative_criteria({"calibration": zero})["ece_below_0_01"]["passed"] is False
    assert generative_criteria({"calibration": {"absent": "x"}})["ece_below_0_01"]["passed"] is None
    path = plot_reliability(sec.figure_data["reliability"], tmp_path / "calibration_reliability.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sections_absent_without_a_run_or_peaks(data):
    bare = EvalData(dict(OPTS), data.info, data.schema, data.mask, {}, data.train, data.test, data.peaks, 4)
    for fn in (completion_section, joint_likelihood_section, calibration_section):
        assert fn(bare).results == {"absent": "no --run_dir given"}
    no_peaks = EvalData(dict(OPTS), data.info, data.schema, data.mask, {}, data.train, data.test, None, 4)
    no_peaks.cache.update(data.cache)
    assert completion_section(no_peaks).results == {"absent": "peak voxels unknown for this kernel"}
