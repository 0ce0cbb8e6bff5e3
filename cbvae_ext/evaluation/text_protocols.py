"""NeuroQuery as a baseline, and the field's protocols for "words or conditions in, brain map out".

* **NeuroQuery** (Dockès et al., 2020): its own estimator (``neuroquery.smoothed_regression.SmoothedRegression``:
  NMF covariance smoothing of the tf-idf, GCV ridge with feature selection), fitted on the training
  studies with text (``terms.npz``) to the same target maps the other baselines use, scored on the test
  studies with text (NaN elsewhere, so a paired criterion against the model uses the maps with text).
* **Peak log-likelihood** (NeuroQuery's): each predicted map as a density over the mask; the mean log
  density at the study's peak voxels, minus the same for the training mean map's density.
* **Mitchell's pairwise test** (Mitchell et al., 2008): for seeded random pairs ``(i, j)`` of test
  studies, a predictor is right when ``r(p_i, y_i) + r(p_j, y_j) > r(p_i, y_j) + r(p_j, y_i)`` (ties half).
* **Title only**: each test study predicted from its title alone: NeuroQuery through its vocabulary
  (``neuroquery.tokenization.TextVectorizer``) and the training idf; the model through the app's
  topic rule (``cbvae_ext.app.words.TopicVocabulary``: the title's topic mixture as the only condition).

Peaks: the dataset stores MA maps, not the coordinate table; the peak voxels are those recoverable from
them (``passes.peak_indicator``: the voxels at the map's maximum under the ALE kernel). Each function
below is ``section(data: EvalData) -> Section`` (``section.py``) or a pure per-map computation it uses.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse

from cbvae_ext.data.neuroquery import fast_ridge_gcv, texts_tfidf
from cbvae_ext.evaluation.columns import (
    MITCHELL,
    MODEL_COND,
    NEUROQUERY,
    PEAK_AUC,
    PEAK_LOGLIK,
    PROTOCOL_PREDICTORS,
    TITLE,
    column,
)
from cbvae_ext.evaluation.criteria import floor_criterion
from cbvae_ext.evaluation.metrics import peak_auc, score_maps
from cbvae_ext.evaluation.section import EvalData, Section

__all__ = [
    "DENSITY_FLOOR",
    "NeuroQueryBaseline",
    "density",
    "mitchell_pairs",
    "mitchell_scores",
    "neuroquery_section",
    "peak_log_likelihood",
    "protocols_section",
    "title_section",
    "title_tfidf",
]

#: Share of uniform density mixed into every predicted density, so a map that is 0 at a peak gets a finite
#: (very low) log density instead of -inf.
DENSITY_FLOOR = 0.01
#: Pairs drawn for Mitchell's test (all pairs when there are fewer).
N_MITCHELL_PAIRS = 10_000
#: The issue's goal for Mitchell's accuracy (NeuroQuery reports > 72 %).
MITCHELL_GOAL = 0.72


class NeuroQueryBaseline:
    """NeuroQuery's ``SmoothedRegression`` from a study's term tf-idf to its map (fitted on training studies).

    The library's own parts, in its order: ``CovarianceSmoothing`` (NMF) of the tf-idf (applied to a query
    when predicting), ``AdaptiveRidge``'s feature penalty (terms whose positive z-map energy stands out are
    kept), then ``RidgeGCV`` on the kept terms for every voxel. One change for memory and time: the feature penalty (a mean of squared z over
    voxels) is estimated on a systematic subsample of at most ``max_selection_voxels`` voxels, instead of a
    ``[terms x voxels]`` fit over all of them (1.7 GB and minutes at 4 mm); the final ridge sees every voxel.

    Args:
        n_components: NMF components of the covariance smoothing (NeuroQuery: 300; capped at the studies).
        smoothing_weight: NeuroQuery's default 0.1.
        max_selection_voxels: voxels used to estimate the feature penalty.
    """

    def __init__(
        self, n_components: int = 300, smoothing_weight: float = 0.1, max_selection_voxels: int = 4096
    ) -> None:
        self.n_components = int(n_components)
        self.smoothing_weight = float(smoothing_weight)
        self.max_selection_voxels = int(max_selection_voxels)
        self.model: Any = None

    def fit(self, tfidf: scipy.sparse.spmatrix, maps: np.ndarray) -> NeuroQueryBaseline:
        from neuroquery import nmf, ridge
        from neuroquery.smoothed_regression import SmoothedRegression

        x = scipy.sparse.csr_matrix(tfidf, dtype=np.float64).toarray()
        y = np.asarray(maps, np.float64)
        model = SmoothedRegression(n_components=min(self.n_components, len(x)), smoothing_weight=self.smoothing_weight)
        # as SmoothedRegression.fit: the ridge is fitted on the raw tf-idf, the smoothing applied when predicting
        model.smoothing_ = nmf.CovarianceSmoothing(model.n_components, model.smoothing_weight).fit(x)
        step = max(1, -(-y.shape[1] // self.max_selection_voxels))
        with fast_ridge_gcv():  # the library's errors without its n x n hat matrix per alpha
            adapt = ridge.AdaptiveRidge(alphas=model.alphas).fit(x, y[:, ::step])
            reg = ridge.SelectiveRidge(alphas=model.alphas)
            reg.original_n_features_ = x.shape[1]
            reg.selected_features_ = np.flatnonzero(adapt.feat_penalty_ < adapt.feat_penalty_.max())
            reg.feat_penalty_ = adapt.feat_penalty_[reg.selected_features_]
            # SelectiveRidge.fit minus its all-voxel AdaptiveRidge: the GCV ridge on the kept terms
            ridge.RidgeGCV.fit(reg, x[:, reg.selected_features_], y)
        model.regression_ = reg
        self.model = model
        return self

    @property
    def n_selected_terms(self) -> int:
        return int(len(self.model.regression_.selected_features_))

    def predict(self, tfidf: scipy.sparse.spmatrix) -> np.ndarray:
        if self.model is None:
            raise RuntimeError("NeuroQueryBaseline.predict called before fit")
        x = scipy.sparse.csr_matrix(tfidf, dtype=np.float64).toarray()
        return np.asarray(self.model.predict(x), dtype=np.float32)


#: Titles as NeuroQuery tf-idf rows on the dataset's scale (``cbvae_ext.data.neuroquery.texts_tfidf``).
title_tfidf = texts_tfidf


def density(maps: np.ndarray, floor: float = DENSITY_FLOOR) -> np.ndarray:
    """Each map as a probability density over the mask: positive part over its sum, mixed with ``floor`` of
    uniform (a map with no positive voxel is uniform)."""
    pos = np.clip(np.asarray(maps, dtype=np.float64), 0.0, None)
    total = pos.sum(axis=1, keepdims=True)
    v = pos.shape[1]
    shape = np.where(total > 0, pos / np.where(total > 0, total, 1.0), 1.0 / v)
    return (1.0 - floor) * shape + floor / v


def peak_log_likelihood(pred: np.ndarray, peaks: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """NeuroQuery's held-out peak log-likelihood per map, relative to a reference map.

    Args:
        pred: ``[N, V]`` predicted maps (rows of NaN: no prediction).
        peaks: ``[N, V]`` bool peak voxels of each study.
        reference: ``[V]`` the reference map (the training mean map).

    Returns:
        ``[N]`` mean log density of ``pred`` at the study's peaks minus the same for ``reference`` (nats per
        peak; 0 = as good as the training mean, NaN without peaks or prediction).
    """
    pred, peaks = np.asarray(pred, dtype=np.float64), np.asarray(peaks, dtype=bool)
    defined = np.isfinite(pred).all(axis=1) & peaks.any(axis=1)
    out = np.full(len(pred), np.nan)
    if not defined.any():
        return out
    log_p = np.log(density(pred[defined]))
    log_ref = np.log(density(np.asarray(reference, np.float64)[None]))[0]
    k = peaks[defined]
    out[defined] = (np.where(k, log_p, 0.0).sum(1) - (k * log_ref).sum(1)) / k.sum(1)
    return out


def mitchell_pairs(n: int, rng: np.random.Generator, n_pairs: int = N_MITCHELL_PAIRS) -> np.ndarray:
    """``[P, 2]`` distinct unordered pairs of ``n`` rows: all of them, or ``n_pairs`` drawn without replacement."""
    i, j = np.triu_indices(n, k=1)
    pairs = np.stack([i, j], axis=1)
    if len(pairs) > n_pairs:
        pairs = pairs[np.sort(rng.choice(len(pairs), n_pairs, replace=False))]
    return pairs


def _corr_matrix(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``[N, N]`` Pearson r of every prediction (rows) with every real map (columns)."""
    p = pred - pred.mean(1, keepdims=True)
    t = target - target.mean(1, keepdims=True)
    pn, tn = np.linalg.norm(p, axis=1), np.linalg.norm(t, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (p @ t.T) / np.outer(pn, tn)


def mitchell_scores(pred: np.ndarray, target: np.ndarray, pairs: np.ndarray) -> tuple[float, np.ndarray]:
    """Mitchell's pairwise accuracy and each map's share of its pairs decided right.

    A pair ``(i, j)`` is right when ``r(p_i, y_i) + r(p_j, y_j) > r(p_i, y_j) + r(p_j, y_i)``, half when
    equal (a predictor that gives every study the same map scores exactly 0.5). Undefined correlations
    (a constant map) count as 0.

    Returns:
        ``(accuracy over pairs, [N] per-map share; NaN for a map in no pair)``.
    """
    r = np.nan_to_num(_corr_matrix(np.asarray(pred, np.float64), np.asarray(target, np.float64)), nan=0.0)
    i, j = pairs[:, 0], pairs[:, 1]
    margin = r[i, i] + r[j, j] - r[i, j] - r[j, i]
    # relative tolerance: the same map for both studies gives a difference of rounding size
    tol = 1e-9 * (np.abs(r[i, i]) + np.abs(r[j, j]) + np.abs(r[i, j]) + np.abs(r[j, i]) + 1e-12)
    outcome = np.where(margin > tol, 1.0, np.where(margin < -tol, 0.0, 0.5))
    n = len(pred)
    hits = np.bincount(i, outcome, n) + np.bincount(j, outcome, n)
    count = np.bincount(i, minlength=n) + np.bincount(j, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_map = np.where(count > 0, hits / np.maximum(count, 1), np.nan)
    return (float(outcome.mean()) if outcome.size else float("nan")), per_map


# ----- sections -------------------------------------------------------------------------------------------
def _terms_rows(data: EvalData) -> tuple[Any, np.ndarray, np.ndarray] | None:
    """``(terms, train rows, test rows)`` of the dataset's ``terms.npz`` (rows by study id), or None."""
    from cbvae_ext.data.neuroquery import load_terms

    terms = load_terms(data.info.path)
    if terms is None:
        return None
    row_of = {str(i): k for k, i in enumerate(data.info.metadata["id"])}
    return terms, np.array([row_of[i] for i in data.train.ids]), np.array([row_of[i] for i in data.test.ids])


#: Why NeuroQuery is absent from a dataset folder built without terms.
NO_TERMS = (
    "the dataset has no terms.npz (NeuroQuery text); rebuild it with python -m cbvae_ext.data build --terms "
    "to add the NeuroQuery baseline"
)


#: Why NeuroQuery is absent when the evaluation was told not to fit it.
NEUROQUERY_OFF = "switched off (--neuroquery false)"


def neuroquery_section(data: EvalData) -> Section:
    """NeuroQuery fitted on the training studies with text, scored on the test studies with text.

    Writes ``data.cache["neuroquery"]`` (``{"model", "terms", "predictions", "train_rows", "test_rows"}``,
    predictions ``[N_test, V]`` with NaN rows for studies without text; the rows index ``terms.npz``) for the
    protocols, the title-only and the unseen-pairs sections.
    """
    if not data.opts.get("neuroquery", True):
        return Section("neuroquery", {"absent": NEUROQUERY_OFF})
    found = _terms_rows(data)
    if found is None:
        return Section("neuroquery", {"absent": NO_TERMS})
    terms, train_rows, test_rows = found
    has_tr, has_te = terms.observed[train_rows], terms.observed[test_rows]
    if has_tr.sum() < 10 or not has_te.any():
        return Section(
            "neuroquery",
            {"absent": f"{int(has_tr.sum())} training and {int(has_te.sum())} test studies have text; need 10 and 1"},
        )
    model = NeuroQueryBaseline().fit(terms.tfidf[train_rows[has_tr]], data.train.maps[has_tr])
    pred = np.full(data.test.maps.shape, np.nan, np.float32)
    pred[has_te] = model.predict(terms.tfidf[test_rows[has_te]])
    scores = score_maps(pred[has_te], data.test.maps[has_te], data.mask)
    if data.peaks is not None:
        scores[PEAK_AUC] = peak_auc(pred[has_te], data.peaks[has_te])
    columns = {}
    for k, v in scores.items():
        full = np.full(data.test.n, np.nan)
        full[has_te] = v
        columns[column(NEUROQUERY, k)] = full
    data.cache["neuroquery"] = {
        "model": model, "terms": terms, "predictions": pred, "train_rows": train_rows, "test_rows": test_rows,
    }  # fmt: skip
    results: dict[str, Any] = {
        "estimator": "neuroquery.smoothed_regression.SmoothedRegression (NMF covariance smoothing, GCV ridge with "
        "feature selection), fitted on the training studies with text to the same target maps",
        "n_fit_maps": int(has_tr.sum()),
        "n_test_with_text": int(has_te.sum()),
        "n_test_without_text": int((~has_te).sum()),
        "n_selected_terms": model.n_selected_terms,
        **{k[len(NEUROQUERY) + 1 :]: data.summary(v) for k, v in columns.items()},
    }
    model_cols = data.cache.get("columns", {})
    paired: dict[str, Any] = {}
    for metric in ("pearson_r", PEAK_AUC):
        a = model_cols.get(column(MODEL_COND, metric))
        if a is not None and column(NEUROQUERY, metric) in columns:
            paired[metric] = data.paired(np.asarray(a), columns[column(NEUROQUERY, metric)])
    results["model_vs_neuroquery_on_studies_with_text"] = paired or {"absent": "no --run_dir given"}
    return Section("neuroquery", results, columns)


def protocols_section(data: EvalData) -> Section:
    """Peak log-likelihood and Mitchell's pairwise test for every predictor in ``data.cache["predictions"]``.

    Predictors are ``PROTOCOL_PREDICTORS`` found in ``data.cache["predictions"]`` (``[N_test, V]``, NaN rows
    for no prediction), NeuroQuery from ``data.cache["neuroquery"]``.
    """
    preds = dict(data.cache.get("predictions", {}))
    if "neuroquery" in data.cache:
        preds[NEUROQUERY] = data.cache["neuroquery"]["predictions"]
    reference = data.train.maps.mean(axis=0)
    target = data.test.maps
    rng = data.rng(17)
    all_pairs = mitchell_pairs(data.test.n, rng)
    columns: dict[str, np.ndarray] = {}
    out: dict[str, Any] = {
        "peak_loglik": {
            "rule": "mean log density at the study's peak voxels of the prediction normalised to a density over the "
            f"mask (positive part, {DENSITY_FLOOR:g} uniform mixed in), minus the same for the training mean map; "
            "nats per peak, 0 = the training mean",
            "peaks": "voxels at the map's maximum (the dataset stores MA maps, not the coordinates)",
        },
        "mitchell": {
            "rule": "seeded pairs (i, j) of test studies; right when r(p_i, y_i) + r(p_j, y_j) > r(p_i, y_j) + "
            "r(p_j, y_i), ties half; per-map value = share of the map's pairs decided right",
            "n_pairs_all": int(len(all_pairs)),
        },
    }
    defined_sets: dict[str, np.ndarray] = {}
    for name in PROTOCOL_PREDICTORS:
        if name not in preds:
            continue
        pred = np.asarray(preds[name], dtype=np.float32)
        defined = np.isfinite(pred).all(axis=1)
        defined_sets[name] = defined
        if data.peaks is not None:
            ll = peak_log_likelihood(pred, data.peaks, reference)
            columns[column(name, PEAK_LOGLIK)] = ll
            out["peak_loglik"][name] = data.summary(ll)
        idx = np.flatnonzero(defined)
        pairs = all_pairs if defined.all() else mitchell_pairs(len(idx), rng)
        acc, per = mitchell_scores(pred[idx], target[idx], pairs)
        per_map = np.full(data.test.n, np.nan)
        per_map[idx] = per
        columns[column(name, MITCHELL)] = per_map
        out["mitchell"][name] = {"accuracy": acc, "n_maps": int(len(idx)), "n_pairs": int(len(pairs))}
    if data.peaks is None:
        out["peak_loglik"]["absent"] = "peak voxels unknown for this kernel"
    # Mitchell's test of the model on the very pairs NeuroQuery was scored on (studies with text)
    if NEUROQUERY in defined_sets and MODEL_COND in preds:
        idx = np.flatnonzero(defined_sets[NEUROQUERY])
        pairs = mitchell_pairs(len(idx), data.rng(17 + 1))
        a_acc, a = mitchell_scores(preds[MODEL_COND][idx], target[idx], pairs)
        b_acc, b = mitchell_scores(preds[NEUROQUERY][idx], target[idx], pairs)
        out["mitchell"]["model_vs_neuroquery_on_studies_with_text"] = {
            "model_accuracy": a_acc,
            "neuroquery_accuracy": b_acc,
            **data.paired(a, b),
        }
    if MODEL_COND in out["mitchell"]:
        out["criteria"] = {
            "mitchell_at_least_0_72": floor_criterion(
                out["mitchell"][MODEL_COND]["accuracy"],
                MITCHELL_GOAL,
                f"Mitchell's pairwise test: the conditional-only map decides >= {MITCHELL_GOAL:.0%} of the test pairs "
                "right (NeuroQuery's paper: > 72 %)",
                None,
            )
        }
        vs = out["mitchell"].get("model_vs_neuroquery_on_studies_with_text")
        if vs is not None:
            out["criteria"]["mitchell_above_neuroquery"] = {
                "rule": "Mitchell's pairwise test on the test studies with text: the conditional-only map's per-map "
                "share of right pairs above NeuroQuery's, paired (CI above 0)",
                **vs,
                "reason": None,
            }
    return Section("protocols", out, columns)


def title_section(data: EvalData) -> Section:
    """Each test study predicted from its title alone, by NeuroQuery and by the model's topic rule."""
    titles = [t if isinstance(t, str) else None for t in data.test.frame.get("title", [None] * data.test.n)]
    has_title = np.array([bool(t and t.strip()) for t in titles])
    out: dict[str, Any] = {
        "source": "the title column of the dataset's metadata.parquet (Neurosynth's metadata)",
        "n_with_title": int(has_title.sum()),
    }
    columns: dict[str, np.ndarray] = {}

    def add(prefix: str, pred: np.ndarray, extra: dict[str, Any]) -> None:
        scores = score_maps(pred, data.test.maps, data.mask)
        if data.peaks is not None:
            scores[PEAK_AUC] = peak_auc(pred, data.peaks)
        res: dict[str, Any] = dict(extra)
        for k in ("pearson_r", PEAK_AUC):
            if k in scores:
                columns[column(prefix, k)] = np.where(has_title, scores[k], np.nan)
                res[k] = data.summary(columns[column(prefix, k)])
        out[prefix.split("/")[0]] = res

    nq = data.cache.get("neuroquery")
    if nq is None:
        out["neuroquery"] = {"absent": NO_TERMS if data.opts.get("neuroquery", True) else NEUROQUERY_OFF}
    else:
        x = title_tfidf(titles, nq["terms"].vocabulary, nq["terms"].idf)
        recognised = np.asarray(x.getnnz(axis=1)) > 0
        add(f"{NEUROQUERY}/{TITLE}", nq["model"].predict(x), {"n_titles_with_a_term": int(recognised.sum())})
    topic_rule = data.cache.get("title_model")
    if topic_rule is None:
        out["cbvae"] = {"absent": "no --run_dir given, or the run's schema has no topic weights (the words rule)"}
    else:
        pred, n_matched = topic_rule(titles)
        rule = "cbvae_ext.app.words topic rule" + (" and the terms embedding" if data.schema.term_dims else "")
        add(f"cbvae/{TITLE}", pred, {"rule": rule, "n_titles_matched": n_matched})
    if column(f"cbvae/{TITLE}", PEAK_AUC) in columns and column(f"{NEUROQUERY}/{TITLE}", PEAK_AUC) in columns:
        mine, theirs = (lambda k: column(f"cbvae/{TITLE}", k)), (lambda k: column(f"{NEUROQUERY}/{TITLE}", k))
        out["model_vs_neuroquery"] = {
            k: data.paired(columns[mine(k)], columns[theirs(k)]) for k in ("pearson_r", PEAK_AUC)
        }
        out["criteria"] = {
            f"title_only_{k}_at_least_neuroquery": data.at_least(
                columns[mine(k)],
                columns[theirs(k)],
                f"title only: the model's {k} (the app's words rule) >= NeuroQuery's from the same titles, paired",
                mine(k),
                theirs(k),
            )  # fmt: skip
            for k in ("pearson_r", PEAK_AUC)
        }
    return Section("title_only", out, columns)
