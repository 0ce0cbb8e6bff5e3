"""What only a generative model gives, measured on the test split: completion, joint peak likelihood, calibration.

* **Completion** (``completion``): each test study's peak voxels split at random (seeded, ``n_half_splits``
  times) into two halves; the first half's MA map (rendered with the dataset's own kernel,
  ``cbvae_ext.data.kernels``) is encoded with the study's conditions and the posterior mean decoded. Scored by
  the AUC of the second half's peak voxels against every other in-mask voxel, the first half's peak voxels
  left out of the ranking altogether (they were given), and by r with the study's full map. Beside it the
  conditional-only map, the first half's own map, its projection on the training PCA (L components) and the
  training mean map (the trivial answer).
* **Joint peak likelihood** (``joint_peak_likelihood``): ``log p(peak voxels | conditions)``. Given z, the
  decoded map normalised to a density over the mask (``text_protocols.density``, the density of NeuroQuery's
  peak log-likelihood) and the peaks i.i.d. from it; z integrated out by importance sampling
  (``likelihood.importance_weighted_bound``: log-mean-exp of ``joint_k`` weights), so the peaks co-vary through
  z. Against the same density of the conditional mean map (peaks independent) and of the training mean map.
* **Calibration** (``calibration``): the event "a reported peak within the kernel's half maximum of the voxel"
  (the study's MA map in loader units at or above 0.5: for the ALE kernel combined by maximum, exactly the
  voxels within FWHM/2 of a peak voxel). The model's probability is the share of ``n_calibration_samples``
  prior draws ``decode(z, conditions)``, ``z ~ N(0, I)``, at or above 0.5; the conditional mean's is its value
  mapped by an isotonic regression fitted on the training split; the trivial answer is the training split's
  rate of the event per voxel. Reliability diagram and expected calibration error over every (study, voxel).

Peaks: the dataset stores MA maps, not the coordinate table, so a study's peaks are its peak voxels
(``passes.peak_indicator``); several foci in one voxel count once. Each ``*_section`` is
``section(data: EvalData) -> Section`` (``section.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from cbvae_ext.evaluation.baselines import PCABaseline
from cbvae_ext.evaluation.columns import (
    CALIBRATION_BRIER,
    COMPLETION_AUC,
    COMPLETION_R,
    HALF_MAP,
    JOINT_PEAK_LOGLIK,
    JOINT_PEAK_LOGLIK_PRIOR,
    MEAN_MAP,
    MODEL,
    MODEL_COND,
    PCA_COMPLETION,
    PEAK_RATE,
    column,
)
from cbvae_ext.evaluation.conditional import conditional_mean_probs
from cbvae_ext.evaluation.criteria import threshold_criterion
from cbvae_ext.evaluation.likelihood import importance_weighted_bound
from cbvae_ext.evaluation.metrics import masked_vectors, peak_auc, pearson_r, to_volumes
from cbvae_ext.evaluation.section import EvalData, Section
from cbvae_ext.evaluation.text_protocols import DENSITY_FLOOR, density

__all__ = [
    "ECE_GOAL",
    "EVENT_LEVEL",
    "N_ECE_BINS",
    "calibration_section",
    "completion_section",
    "expected_calibration_error",
    "generative_criteria",
    "independent_peak_log_likelihood",
    "joint_likelihood_section",
    "joint_peak_log_likelihood",
    "render_peak_maps",
    "split_peaks",
]

#: The calibration event: the study's MA map (loader units) at or above this level, i.e. within the ALE kernel's
#: half maximum (FWHM / 2) of a peak voxel.
EVENT_LEVEL = 0.5
#: Equal-width bins of the reliability diagram and the expected calibration error.
N_ECE_BINS = 10
#: The goal of issue 17: expected calibration error of the per-voxel event probability at most this.
ECE_GOAL = 0.01
#: Training maps (seeded subsample) whose conditional means fit the isotonic map, and (study, voxel) pairs it sees.
_ISOTONIC_MAX_POINTS = 2_000_000


# ----- pure parts -----------------------------------------------------------------------------------------
def split_peaks(voxels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random split of a study's peak voxels (in-mask indices) into a first half of ``n // 2`` and the rest.

    Both halves are sorted and disjoint and together hold every voxel; ``rng`` makes the split reproducible.

    Raises:
        ValueError: fewer than two voxels (no half could be held out).
    """
    voxels = np.asarray(voxels, dtype=np.int64)
    if len(voxels) < 2:
        raise ValueError(f"a study needs at least 2 peak voxels to be split in halves, got {len(voxels)}")
    order = rng.permutation(voxels)
    k = len(voxels) // 2
    return np.sort(order[:k]), np.sort(order[k:])


def render_peak_maps(cube: np.ndarray, mask: np.ndarray, peak_sets: list[np.ndarray]) -> np.ndarray:
    """``[N, V]`` in-mask MA maps in loader units (each over its maximum) of peak sets given as in-mask voxel indices.

    The builder's renderer (``cbvae_ext.data.kernels.render_maps``: the dataset's kernel pasted at every peak,
    combined by maximum), so a study's full peak set gives back its stored map.
    """
    from cbvae_ext.data.kernels import render_maps

    mask = np.asarray(mask, dtype=bool)
    coords = np.argwhere(mask)  # row-major, the order of ``volume[mask]``
    sizes = np.array([len(s) for s in peak_sets], dtype=np.int64)
    out = np.zeros((len(peak_sets), int(mask.sum())), dtype=np.float32)
    if not sizes.sum():
        return out
    ijk = coords[np.concatenate([np.asarray(s, dtype=np.int64) for s in peak_sets])]
    row = np.repeat(np.arange(len(peak_sets)), sizes)
    start = 0
    for batch in render_maps(cube, ijk, row, len(peak_sets), mask, batch_size=256):
        out[start : start + len(batch)] = batch[:, mask]
        start += len(batch)
    return out / np.maximum(out.max(axis=1, keepdims=True), np.finfo(np.float32).tiny)


def independent_peak_log_likelihood(pred: np.ndarray, peaks: np.ndarray) -> np.ndarray:
    """``[N]`` log-likelihood (nats) of each study's peak voxels drawn i.i.d. from ``density(pred)`` (``[N, V]``)."""
    log_d = np.log(density(np.asarray(pred, np.float64)))
    return np.where(np.asarray(peaks, bool), log_d, 0.0).sum(axis=1)


def joint_peak_log_likelihood(
    probs_of_z: Callable[[torch.Tensor], np.ndarray],
    peaks: np.ndarray,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    k: int,
    generator: torch.Generator | None = None,
) -> np.ndarray:
    """``log p(peak voxels | conditions)`` per study, z integrated out by importance sampling.

    Given z the peaks are i.i.d. from the decoded map as a density (``independent_peak_log_likelihood``);
    ``log (1/k) Σ_j p(peaks | z_j) N(z_j; 0, I) / q(z_j)`` with ``z_j ~ q = N(mu, exp(logvar))``
    (``importance_weighted_bound``); ``mu = 0, logvar = 0`` samples the prior (weights ``p(peaks | z_j)``).
    An unbiased estimate of the likelihood, so its log is a lower bound in expectation, tighter as ``k`` grows.

    Args:
        probs_of_z: ``z [B, L] -> [B, V]`` decoded in-mask maps (the study's conditions fixed).
        peaks: ``[B, V]`` bool peak voxels.
        mu: ``[B, L]`` proposal means.
        logvar: ``[B, L]`` proposal log-variances.
        k: importance samples (>= 1).
        generator: seeded generator of the samples.
    """

    def log_likelihood(z: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(independent_peak_log_likelihood(probs_of_z(z), peaks)).to(z.device)

    return importance_weighted_bound(log_likelihood, mu, logvar, k, generator)["iwae"].double().cpu().numpy()


def expected_calibration_error(
    pred: np.ndarray, observed: np.ndarray, n_bins: int = N_ECE_BINS
) -> tuple[float, list[dict[str, Any]]]:
    """Expected calibration error over every value, and the reliability diagram's bins.

    ``ECE = Σ_b (n_b / n) |mean predicted_b - observed frequency_b|`` over ``n_bins`` equal-width bins of the
    predicted probability on [0, 1] (1 falls in the last bin).

    Returns:
        ``(ece, bins)``; each bin ``{lo, hi, n, mean_predicted, observed_frequency}`` (means None when empty).
    """
    p = np.clip(np.asarray(pred, np.float64).ravel(), 0.0, 1.0)
    y = np.asarray(observed, np.float64).ravel()
    if p.shape != y.shape:
        raise ValueError(f"calibration needs one observation per prediction: {p.size} vs {y.size}")
    which = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    n = np.bincount(which, minlength=n_bins).astype(np.float64)
    sum_p, sum_y = np.bincount(which, p, n_bins), np.bincount(which, y, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p, freq = sum_p / n, sum_y / n
    ece = float(np.abs(sum_p - sum_y).sum() / max(p.size, 1))
    bins = [
        {
            "lo": b / n_bins,
            "hi": (b + 1) / n_bins,
            "n": int(n[b]),
            "mean_predicted": float(mean_p[b]) if n[b] else None,
            "observed_frequency": float(freq[b]) if n[b] else None,
        }
        for b in range(n_bins)
    ]
    return ece, bins


# ----- the model ------------------------------------------------------------------------------------------
def _model(data: EvalData) -> tuple[torch.nn.Module, torch.Tensor | None] | None:
    """The C-β-VAE and its decoder's defaults for missing fields (``data.cache["counterfactual"]``), or None."""
    ctx = data.cache.get("counterfactual")
    return None if ctx is None else (ctx["model"], ctx["imputed_defaults"])


def _decoder_conditions(model: torch.nn.Module, imp0: torch.Tensor | None, split: Any, rows: np.ndarray, device: Any):
    """The decoder's conditions of ``rows``: observed fields, missing ones at the run's default (no map seen)."""
    meta = torch.from_numpy(split.meta[rows]).to(device)
    meta_mask = torch.from_numpy(split.meta_mask[rows]).to(device)
    fill = None if imp0 is None else imp0.to(device).expand(len(rows), -1)
    return model.decoder_input(meta, meta_mask, fill)


def _encode(model: torch.nn.Module, maps: np.ndarray, split: Any, rows: np.ndarray, mask: np.ndarray, device: Any):
    volumes = torch.from_numpy(to_volumes(maps, mask))[:, None].to(device)
    meta = torch.from_numpy(split.meta[rows]).to(device)
    meta_mask = torch.from_numpy(split.meta_mask[rows]).to(device)
    mu, logvar = model.encode(volumes, meta, meta_mask)
    return mu.float(), logvar.float()


def _decode(model: torch.nn.Module, z: torch.Tensor, m: torch.Tensor, mask: np.ndarray) -> np.ndarray:
    return masked_vectors(torch.sigmoid(model.decode(z.to(m.device), m).float()).cpu().numpy(), mask)


def _batches(rows: np.ndarray, size: int) -> list[np.ndarray]:
    return [rows[s : s + size] for s in range(0, len(rows), size)]


def _conditional_means(data: EvalData, model: torch.nn.Module, imp0: Any, split: Any, rows: np.ndarray, offset: int):
    """``[len(rows), V]`` conditional mean maps (the network's path or prior decodes, ``conditional_mean_probs``)."""
    gen = data.generator(offset)
    out = []
    for b in _batches(rows, data.opts["batch_size"]):
        m = _decoder_conditions(model, imp0, split, b, data.device)
        probs, _ = conditional_mean_probs(model, m, data.opts["n_prior_samples"], gen)
        out.append(masked_vectors(probs.cpu().numpy(), data.mask))
    return np.concatenate(out) if out else np.zeros((0, int(data.mask.sum())), np.float32)


def _test_conditional_means(data: EvalData, model: torch.nn.Module, imp0: Any, rows: np.ndarray) -> np.ndarray:
    """The workflow's conditional-only test maps (``cache["predictions"]``), or the same recomputed."""
    cached = data.cache.get("predictions", {}).get(MODEL_COND)
    if cached is not None:
        return np.asarray(cached)[rows]
    return _conditional_means(data, model, imp0, data.test, rows, 31)


def _capped(data: EvalData, rows: np.ndarray, offset: int) -> np.ndarray:
    """``rows``, or a seeded sorted subsample of ``generative_max_maps`` of them."""
    cap = data.opts.get("generative_max_maps")
    if cap is not None and len(rows) > cap:
        rows = np.sort(data.rng(offset).choice(rows, int(cap), replace=False))
    return rows


def _kernel_cube(info: Any) -> np.ndarray:
    """The dataset's kernel (``manifest.json``) on its grid, as the builder pastes it."""
    from cbvae_ext.data.grid import Grid
    from cbvae_ext.data.kernels import KernelSpec

    zooms = np.abs(np.diag(np.asarray(info.affine))[:3])
    grid = Grid(np.asarray(info.mask) != 0, np.asarray(info.affine), int(round(float(zooms.mean()))))
    return KernelSpec.from_dict(info.manifest["kernel"]).cube(grid)


def _absent(name: str, data: EvalData) -> Section | None:
    if _model(data) is None:
        return Section(name, {"absent": "no --run_dir given"})
    if data.peaks is None:
        return Section(name, {"absent": "peak voxels unknown for this kernel"})
    return None


def _full(n: int, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = np.full(n, np.nan)
    out[rows] = values
    return out


# ----- sections -------------------------------------------------------------------------------------------
#: Completion predictors, in report order, and their labels.
COMPLETION_PREDICTORS = {
    MODEL: "C-β-VAE: encode the first half's map with the conditions, decode μ",
    MODEL_COND: "conditional-only map (conditions, no map)",
    HALF_MAP: "the first half's own MA map",
    PCA_COMPLETION: "the first half's map projected on the training PCA (L components)",
    MEAN_MAP: "training mean map (trivial answer)",
}


@torch.no_grad()
def completion_section(data: EvalData) -> Section:
    """Completion of each test study from a random half of its peaks, against the simple alternatives."""
    missing = _absent("completion", data)
    if missing is not None:
        return missing
    model, imp0 = _model(data)
    te, mask, n_splits = data.test, data.mask, int(data.opts["n_half_splits"])
    n_peaks = data.peaks.sum(axis=1)
    rows = _capped(data, np.flatnonzero(n_peaks >= 2), 41)
    if not len(rows):
        return Section("completion", {"absent": "no test study has two peak voxels"})
    cube = _kernel_cube(data.info)
    cond = _test_conditional_means(data, model, imp0, rows)
    pca = data.cache.get("pca") or PCABaseline(data.latent_size, seed=data.opts["seed"]).fit(data.train.maps)
    mean_map = data.train.maps.mean(axis=0, dtype=np.float64).astype(np.float32)
    scores = {
        p: {m: np.zeros((len(rows), n_splits)) for m in (COMPLETION_AUC, COMPLETION_R)} for p in COMPLETION_PREDICTORS
    }
    for s in range(n_splits):
        rng = data.rng(43 + s)
        halves = [split_peaks(np.flatnonzero(data.peaks[i]), rng) for i in rows]
        given = np.zeros((len(rows), te.maps.shape[1]), bool)
        held = np.zeros_like(given)
        for j, (a, b) in enumerate(halves):
            given[j, a], held[j, b] = True, True
        first = render_peak_maps(cube, mask, [a for a, _ in halves])
        completed = []
        for b in _batches(np.arange(len(rows)), data.opts["batch_size"]):
            mu, _ = _encode(model, first[b], te, rows[b], mask, data.device)
            completed.append(_decode(model, mu, _decoder_conditions(model, imp0, te, rows[b], data.device), mask))
        preds = {
            MODEL: np.concatenate(completed),
            MODEL_COND: cond,
            HALF_MAP: first,
            PCA_COMPLETION: pca.predict(first, data.latent_size),
            MEAN_MAP: np.broadcast_to(mean_map, first.shape),
        }
        for name, pred in preds.items():
            scores[name][COMPLETION_AUC][:, s] = peak_auc(pred, held, exclude=given)
            scores[name][COMPLETION_R][:, s] = pearson_r(pred, te.maps[rows])
    columns = {
        column(p, m): _full(te.n, rows, np.nanmean(v, axis=1)) for p, per in scores.items() for m, v in per.items()
    }
    results: dict[str, Any] = {
        "rule": f"each study's peak voxels split at random (seed + 43 + split, {n_splits} splits, first half = "
        "n // 2 voxels); the first half's MA map rendered with the dataset's kernel; AUC ranks the second half's "
        "peak voxels against every other in-mask voxel, the first half's peak voxels left out of the ranking (given, "
        "neither positive nor negative); r = Pearson r with the study's full map; per study the mean over splits",
        "peaks": "peak voxels read from the stored MA maps (several foci in one voxel count once)",
        "n_studies": int(len(rows)),
        "n_test_with_two_peaks": int((n_peaks >= 2).sum()),
        "n_half_splits": n_splits,
        "predictors": {
            p: {"label": label, **{m: data.summary(columns[column(p, m)]) for m in (COMPLETION_AUC, COMPLETION_R)}}
            for p, label in COMPLETION_PREDICTORS.items()
        },
        "model_vs": {
            p: {
                m: data.paired(columns[column(MODEL, m)], columns[column(p, m)]) for m in (COMPLETION_AUC, COMPLETION_R)
            }
            for p in COMPLETION_PREDICTORS
            if p != MODEL
        },
    }
    return Section("completion", results, columns)


@torch.no_grad()
def joint_likelihood_section(data: EvalData) -> Section:
    """``log p(all peak voxels | conditions)`` with peaks co-varying through z, against independent peaks."""
    missing = _absent("joint_peak_likelihood", data)
    if missing is not None:
        return missing
    model, imp0 = _model(data)
    te, mask, k = data.test, data.mask, int(data.opts["joint_k"])
    n_peaks = data.peaks.sum(axis=1)
    rows = _capped(data, np.flatnonzero(n_peaks >= 1), 51)
    if not len(rows):
        return Section("joint_peak_likelihood", {"absent": "no test study has a peak voxel"})
    joint, prior = [], []
    gen = data.generator(53)
    for b in _batches(rows, data.opts["batch_size"]):
        m = _decoder_conditions(model, imp0, te, b, data.device)
        peaks = data.peaks[b]

        def probs(z: torch.Tensor, m: torch.Tensor = m) -> np.ndarray:
            return _decode(model, z, m, mask)

        mu, logvar = _encode(model, te.maps[b], te, b, mask, data.device)
        joint.append(joint_peak_log_likelihood(probs, peaks, mu, logvar, k, gen))
        zero = torch.zeros_like(mu)
        prior.append(joint_peak_log_likelihood(probs, peaks, zero, zero, k, gen))
    cond = _test_conditional_means(data, model, imp0, rows)
    mean_map = data.train.maps.mean(axis=0, dtype=np.float64)[None]
    per_study = {
        MODEL: np.concatenate(joint),
        "prior": np.concatenate(prior),
        MODEL_COND: independent_peak_log_likelihood(cond, data.peaks[rows]),
        MEAN_MAP: independent_peak_log_likelihood(np.broadcast_to(mean_map, cond.shape), data.peaks[rows]),
    }
    names = {
        MODEL: column(MODEL, JOINT_PEAK_LOGLIK),
        "prior": column(MODEL, JOINT_PEAK_LOGLIK_PRIOR),
        MODEL_COND: column(MODEL_COND, JOINT_PEAK_LOGLIK),
        MEAN_MAP: column(MEAN_MAP, JOINT_PEAK_LOGLIK),
    }
    columns = {names[p]: _full(te.n, rows, v) for p, v in per_study.items()}
    count = n_peaks[rows].astype(np.float64)
    per_peak = {p: _full(te.n, rows, v / count) for p, v in per_study.items()}
    results: dict[str, Any] = {
        "rule": "given z, the decoded map sigmoid(decode(z, conditions)) as a density over the mask (positive part "
        f"over its sum, {DENSITY_FLOOR:g} uniform mixed in: the density of the peak log-likelihood protocol) and the "
        "study's peak voxels i.i.d. from it; z integrated out by importance sampling, log-mean-exp over joint_k "
        "weights p(peaks | z) N(z; 0, I) / q(z). Conditional mean and training mean: the same density of one map, "
        "peaks independent. Nats per study (sum over its peak voxels) and per peak voxel",
        "proposal": "q(z | the study's map, its conditions) (the encoder's posterior, as in the IWAE bound); "
        "joint_prior: the prior N(0, I) as proposal (weights p(peaks | z)), a looser estimate of the same quantity",
        "joint_k": k,
        "n_studies": int(len(rows)),
        "n_peak_voxels": data.summary(_full(te.n, rows, count)),
        "per_study": {
            "joint": data.summary(columns[names[MODEL]]),
            "joint_prior": data.summary(columns[names["prior"]]),
            "conditional_mean": data.summary(columns[names[MODEL_COND]]),
            "training_mean": data.summary(columns[names[MEAN_MAP]]),
        },
        "gain_per_study": {
            "vs_conditional_mean": data.paired(columns[names[MODEL]], columns[names[MODEL_COND]]),
            "vs_training_mean": data.paired(columns[names[MODEL]], columns[names[MEAN_MAP]]),
            "prior_proposal_vs_conditional_mean": data.paired(columns[names["prior"]], columns[names[MODEL_COND]]),
            "conditional_mean_vs_training_mean": data.paired(columns[names[MODEL_COND]], columns[names[MEAN_MAP]]),
        },
        "gain_per_peak": {
            "vs_conditional_mean": data.paired(per_peak[MODEL], per_peak[MODEL_COND]),
            "vs_training_mean": data.paired(per_peak[MODEL], per_peak[MEAN_MAP]),
        },
    }
    return Section("joint_peak_likelihood", results, columns)


def _isotonic(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> Any:
    """An increasing map from a predicted value to the event's frequency, fitted on (at most 2M) training pairs."""
    from sklearn.isotonic import IsotonicRegression

    x, y = x.ravel(), y.ravel()
    if x.size > _ISOTONIC_MAX_POINTS:
        keep = rng.choice(x.size, _ISOTONIC_MAX_POINTS, replace=False)
        x, y = x[keep], y[keep]
    return IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(x, y)


@torch.no_grad()
def calibration_section(data: EvalData) -> Section:
    """Per-voxel probability of a peak nearby from sampled maps; reliability and ECE beside the conditional mean's."""
    missing = _absent("calibration", data)
    if missing is not None:
        return missing
    model, imp0 = _model(data)
    te, tr, mask, n_samples = data.test, data.train, data.mask, int(data.opts["n_calibration_samples"])
    rows = _capped(data, np.arange(te.n), 57)
    observed = te.maps[rows] >= EVENT_LEVEL
    gen = data.generator(59)
    sampled = []
    for b in _batches(rows, data.opts["batch_size"]):
        m = _decoder_conditions(model, imp0, te, b, data.device)
        hits = np.zeros((len(b), te.maps.shape[1]), np.float32)
        for _ in range(n_samples):
            z = torch.randn((len(b), int(model.latent_size)), generator=gen)
            hits += _decode(model, z, m, mask) >= EVENT_LEVEL
        sampled.append(hits / n_samples)
    fit_rows = _capped(data, np.arange(tr.n), 61)
    train_cond = _conditional_means(data, model, imp0, tr, fit_rows, 63)
    iso = _isotonic(train_cond, tr.maps[fit_rows] >= EVENT_LEVEL, data.rng(65))
    cond = _test_conditional_means(data, model, imp0, rows)
    preds = {
        MODEL: np.concatenate(sampled),
        MODEL_COND: iso.predict(cond.ravel().astype(np.float64)).reshape(cond.shape),
        PEAK_RATE: np.broadcast_to((tr.maps >= EVENT_LEVEL).mean(axis=0), observed.shape),
    }
    labels = {
        MODEL: f"C-β-VAE: share of {n_samples} prior draws decode(z, conditions) >= {EVENT_LEVEL:g}",
        MODEL_COND: "conditional mean map, isotonic map fitted on the training split",
        PEAK_RATE: "training rate of the event per voxel (trivial answer)",
    }
    columns, out, reliability = {}, {}, {}
    for name, pred in preds.items():
        ece, bins = expected_calibration_error(pred, observed)
        columns[column(name, CALIBRATION_BRIER)] = _full(te.n, rows, ((pred - observed) ** 2).mean(axis=1))
        out[name] = {
            "label": labels[name],
            "ece": ece,
            "brier": data.summary(columns[column(name, CALIBRATION_BRIER)]),
            "bins": bins,
        }
        reliability[labels[name]] = bins
    results: dict[str, Any] = {
        "event": f"the study's MA map (loader units) >= {EVENT_LEVEL:g}: a reported peak voxel within the kernel's "
        "half maximum (FWHM / 2 for the ALE kernel) of the voxel",
        "mapping": "model: share of prior draws above the event level (no fitting); conditional mean: isotonic "
        f"regression on the training split ({len(fit_rows)} maps); peak rate: training frequency per voxel",
        "n_bins": N_ECE_BINS,
        "ece": "sum over equal-width bins of (n_bin / n) |mean predicted - observed frequency|, over every (study, "
        "in-mask voxel) pair",
        "n_studies": int(len(rows)),
        "n_calibration_samples": n_samples,
        "event_rate_test": float(observed.mean()),
        # predicting 0 everywhere scores ECE = the event rate: the bar any ECE must be read against
        "ece_of_zero": float(observed.mean()),
        "predictors": out,
        "brier_model_vs": {
            p: data.paired(columns[column(MODEL, CALIBRATION_BRIER)], columns[column(p, CALIBRATION_BRIER)], "less")
            for p in (MODEL_COND, PEAK_RATE)
        },
    }
    return Section("calibration", results, columns, {"reliability": reliability})


def generative_criteria(results: dict[str, Any]) -> dict[str, Any]:
    """The criteria of ``results["calibration"]`` that are not paired columns (``ece_below_0_01``)."""
    cal = results.get("calibration", {})
    ece = None if "absent" in cal else cal["predictors"][MODEL]["ece"]
    rule = (
        f"expected calibration error of the sampled per-voxel event probability <= {ECE_GOAL:g} and below the ECE of "
        "predicting 0 everywhere (the event rate, which is itself below the goal when events are rare)"
    )
    crit = threshold_criterion(ece, ECE_GOAL, rule, cal.get("absent"))
    if ece is not None:
        crit["ece_of_zero"] = cal["ece_of_zero"]
        crit["passed"] = bool(ece <= ECE_GOAL and ece < cal["ece_of_zero"])
    return {"ece_below_0_01": crit}
