"""Non-neural reference predictors scored on the same held-out maps as the VAEs.

All baselines work on ``[N, V]`` in-mask vectors in normalised units and follow the scikit-learn
``fit`` / ``predict`` shape: ``fit`` sees only the training split. ``baselines_section`` is the evaluation's
``baselines`` section.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from sklearn.decomposition import PCA

from cbvae_ext.evaluation.columns import (
    CATEGORY_MEAN,
    CONSTANT_MAP,
    LOGLIK,
    MEAN_MAP,
    PEAK_AUC,
    SSIM,
    TOPIC_RIDGE,
    pca,
)
from cbvae_ext.evaluation.conditional import topic_weights
from cbvae_ext.evaluation.likelihood import latent_free_nll
from cbvae_ext.evaluation.metrics import peak_auc, pearson_r, score_maps, ssim_masked
from cbvae_ext.evaluation.runs import EvaluationError
from cbvae_ext.evaluation.section import EvalData, Section, prefixed

__all__ = [
    "CategoryMeanBaseline",
    "MeanMapBaseline",
    "PCABaseline",
    "TopicRidgeBaseline",
    "baselines_section",
    "equivalent_dimension",
    "pca_dims",
]


class PCABaseline:
    """Linear auto-encoder: project onto the top ``n_components`` training principal components and back.

    Args:
        n_components: number of components, set to the VAE latent size for a like-for-like comparison.
        seed: seed of the randomized SVD solver.
    """

    def __init__(self, n_components: int, seed: int = 0) -> None:
        self.n_components = int(n_components)
        self.seed = seed
        self.pca: PCA | None = None

    def fit(self, train: np.ndarray) -> PCABaseline:
        n, v = train.shape
        if self.n_components > min(n, v):
            raise ValueError(f"PCA n_components={self.n_components} exceeds min(n_train={n}, n_voxels={v})")
        self.pca = PCA(n_components=self.n_components, random_state=self.seed).fit(train)
        return self

    def transform(self, maps: np.ndarray, n_components: int | None = None) -> np.ndarray:
        """Scores of each map on the first ``n_components`` (default all) principal components."""
        if self.pca is None:
            raise RuntimeError("PCABaseline used before fit")
        d = self.n_components if n_components is None else int(n_components)
        return (np.asarray(maps, dtype=np.float32) - self.pca.mean_) @ self.pca.components_[:d].T

    def predict(self, maps: np.ndarray, n_components: int | None = None) -> np.ndarray:
        """Reconstruction of each map from its first ``n_components`` (default all fitted) scores, not clipped.

        Components are ordered by explained variance, so one fit at the largest size serves every smaller
        one (the PCA curve).
        """
        d = self.n_components if n_components is None else int(n_components)
        scores = self.transform(maps, d)
        return (scores @ self.pca.components_[:d] + self.pca.mean_).astype(np.float32)

    @property
    def explained_variance_ratio(self) -> float:
        return float(self.pca.explained_variance_ratio_.sum()) if self.pca is not None else float("nan")

    def explained_variance_at(self, n_components: int) -> float:
        return float(self.pca.explained_variance_ratio_[: int(n_components)].sum())


def equivalent_dimension(dims: list[int], scores: list[float], value: float) -> dict:
    """The number of PCA components whose score equals ``value``, interpolated linearly in log2(components).

    Args:
        dims: increasing component counts (e.g. L, 2L, 4L, 8L).
        scores: the PCA's mean score at each count (increasing with the count).
        value: the model's mean score.

    Returns:
        ``{"components": float | None, "bound": None | "below" | "above"}``: ``below`` when the model scores
        under PCA with ``dims[0]`` components, ``above`` when over ``dims[-1]`` (then ``components`` is None).
    """
    x, y = np.log2(np.asarray(dims, dtype=np.float64)), np.asarray(scores, dtype=np.float64)
    if value < y[0]:
        return {"components": None, "bound": "below"}
    if value > y[-1]:
        return {"components": None, "bound": "above"}
    # np.interp needs increasing y; PCA scores rise with components, a non-monotone step is kept monotone
    return {"components": float(2 ** np.interp(value, np.maximum.accumulate(y), x)), "bound": None}


class MeanMapBaseline:
    """Predicts the voxel-wise mean training map for every study."""

    def __init__(self) -> None:
        self.mean: np.ndarray | None = None

    def fit(self, train: np.ndarray) -> MeanMapBaseline:
        self.mean = np.asarray(train, dtype=np.float64).mean(axis=0).astype(np.float32)
        return self

    def predict(self, n: int) -> np.ndarray:
        if self.mean is None:
            raise RuntimeError("MeanMapBaseline.predict called before fit")
        return np.broadcast_to(self.mean, (n, self.mean.size)).copy()


class CategoryMeanBaseline:
    """Predicts the mean training map of the study's task category.

    A study whose category is missing (``-1``) or unseen in training gets the overall training mean.
    """

    def __init__(self) -> None:
        self.means: dict[int, np.ndarray] = {}
        self.overall: np.ndarray | None = None

    def fit(self, train: np.ndarray, categories: Iterable[int]) -> CategoryMeanBaseline:
        train = np.asarray(train, dtype=np.float64)
        categories = np.asarray(list(categories), dtype=np.int64)
        self.overall = train.mean(axis=0).astype(np.float32)
        self.means = {
            int(c): train[categories == c].mean(axis=0).astype(np.float32) for c in np.unique(categories) if c >= 0
        }
        return self

    def predict(self, categories: Iterable[int]) -> np.ndarray:
        if self.overall is None:
            raise RuntimeError("CategoryMeanBaseline.predict called before fit")
        return np.stack([self.means.get(int(c), self.overall) for c in categories]).astype(np.float32)


class TopicRidgeBaseline:
    """Ridge regression from a study's 50 LDA topic weights to its map (metadata-only prediction).

    The penalty is chosen on a seeded 20% hold-out of the training split (mean Pearson r), then the
    model is refit on the whole training split. Closed form on centred inputs: 50 features, any number of voxels.

    Args:
        alphas: candidate ridge penalties (on standardised topic weights).
        seed: seed of the inner hold-out.
    """

    def __init__(self, alphas: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0, 10000.0), seed: int = 0) -> None:
        self.alphas = tuple(alphas)
        self.seed = seed
        self.alpha: float | None = None
        self._fit: tuple[np.ndarray, ...] | None = None

    @staticmethod
    def _solve(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, ...]:
        mx, sx = x.mean(0), x.std(0) + 1e-12
        xs = (x - mx) / sx
        my = y.mean(0)
        w = np.linalg.solve(xs.T @ xs + alpha * np.eye(x.shape[1]), xs.T @ (y - my))
        return mx, sx, my, w

    @staticmethod
    def _apply(fit: tuple[np.ndarray, ...], x: np.ndarray) -> np.ndarray:
        mx, sx, my, w = fit
        return (((x - mx) / sx) @ w + my).astype(np.float32)

    def fit(self, topics: np.ndarray, maps: np.ndarray) -> TopicRidgeBaseline:
        x, y = np.asarray(topics, dtype=np.float64), np.asarray(maps, dtype=np.float32)
        inner = np.random.default_rng(self.seed).random(len(x)) < 0.2
        scores = [
            np.nanmean(pearson_r(self._apply(self._solve(x[~inner], y[~inner], a), x[inner]), y[inner]))
            for a in self.alphas
        ]
        self.alpha = float(self.alphas[int(np.nanargmax(scores))])
        self._fit = self._solve(x, y, self.alpha)
        return self

    def predict(self, topics: np.ndarray) -> np.ndarray:
        if self._fit is None:
            raise RuntimeError("TopicRidgeBaseline.predict called before fit")
        return self._apply(self._fit, np.asarray(topics, dtype=np.float64))


def pca_dims(latent_size: int, n_train: int, n_voxels: int) -> list[int]:
    """The PCA sizes compared with the model: L, 2L, 4L, 8L components, those the training maps allow."""
    limit = min(n_train, n_voxels)
    return [d for d in (latent_size, 2 * latent_size, 4 * latent_size, 8 * latent_size) if d <= limit]


def baselines_section(data: EvalData) -> Section:
    """PCA at L, 2L, 4L, 8L, the mean map, a constant map, the category mean and the topic ridge (train fit).

    Writes ``data.cache["pca"]`` (``PCABaseline`` with the largest of ``data.cache["pca_dims"]`` components),
    ``data.cache["pca_dims"]``, ``data.cache["category_mean"]`` (the fitted ``CategoryMeanBaseline``) and the
    ``MEAN_MAP``, ``CATEGORY_MEAN`` and ``TOPIC_RIDGE`` entries of ``data.cache["predictions"]``.

    Raises:
        EvaluationError: fewer training maps than the latent size (no PCA with L components).
    """
    tr, te, mask, latent = data.train, data.test, data.mask, data.latent_size
    if latent > min(tr.n, tr.maps.shape[1]):
        raise EvaluationError(f"PCA with {latent} components needs more than {tr.n} training maps; use more")
    dims = pca_dims(latent, tr.n, tr.maps.shape[1])
    fit = PCABaseline(max(dims), seed=data.opts["seed"]).fit(tr.maps)
    data.cache.update(pca=fit, pca_dims=dims)
    columns: dict[str, np.ndarray] = {}
    curve = []
    for d in dims:
        columns.update(prefixed(pca(d), score_maps(fit.predict(te.maps, d), te.maps, mask, ssim=d == latent)))
        curve.append(
            {
                "n_components": d,
                "explained_variance_ratio": fit.explained_variance_at(d),
                **data.summaries(columns, pca(d)),
            }
        )
    out: dict[str, Any] = {"pca": {**curve[0], "n_fit_maps": tr.n}, "pca_curve": curve}
    category = CategoryMeanBaseline().fit(tr.maps, tr.categories)
    data.cache["category_mean"] = category
    predictions = {
        MEAN_MAP: MeanMapBaseline().fit(tr.maps).predict(te.n),
        CATEGORY_MEAN: category.predict(te.categories),
    }
    data.cache.setdefault("predictions", {}).update(predictions)
    for name, pred in predictions.items():
        scores = score_maps(pred, te.maps, mask, ssim=name == MEAN_MAP)
        if data.peaks is not None:
            scores[PEAK_AUC] = peak_auc(pred, data.peaks)
        scores[LOGLIK] = -latent_free_nll(pred, te.maps)
        columns.update(prefixed(name, scores))
        out[name] = data.summaries(columns, name)
    constant = np.full_like(te.maps, float(tr.maps.mean()))
    columns.update(prefixed(CONSTANT_MAP, {SSIM: ssim_masked(constant, te.maps, mask)}))
    out[CONSTANT_MAP] = {"value": float(tr.maps.mean()), **data.summaries(columns, CONSTANT_MAP)}
    out[TOPIC_RIDGE] = _topic_ridge(data, columns)
    return Section("baselines", out, columns)


def _topic_ridge(data: EvalData, columns: dict[str, np.ndarray]) -> dict[str, Any]:
    """The ridge from topic weights to maps; its columns go into ``columns``."""
    tr_topics, te_topics = topic_weights(data.schema, data.train), topic_weights(data.schema, data.test)
    if tr_topics is None:
        return {"absent": "the dataset's schema has no topic weights (rebuild the dataset with topics)"}
    (x_tr, obs_tr), (x_te, obs_te) = tr_topics, te_topics
    if obs_tr.sum() < 10 or not obs_te.any():
        return {"absent": "too few training or test maps with topic weights"}
    ridge = TopicRidgeBaseline(seed=data.opts["seed"]).fit(x_tr[obs_tr], data.train.maps[obs_tr])
    pred = ridge.predict(x_te)
    data.cache.setdefault("predictions", {})[TOPIC_RIDGE] = np.where(obs_te[:, None], pred, np.nan).astype(np.float32)
    scores = score_maps(pred, data.test.maps, data.mask)
    if data.peaks is not None:
        scores[PEAK_AUC] = peak_auc(pred, data.peaks)
    columns.update(prefixed(TOPIC_RIDGE, {k: np.where(obs_te, v, np.nan) for k, v in scores.items()}))
    return {"alpha": ridge.alpha, "n_fit_maps": int(obs_tr.sum()), **data.summaries(columns, TOPIC_RIDGE)}
