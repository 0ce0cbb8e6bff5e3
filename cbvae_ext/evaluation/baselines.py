"""Non-neural reference predictors scored on the same held-out maps as the VAEs.

All baselines work on ``[N, V]`` in-mask vectors in normalised units and follow the scikit-learn
``fit`` / ``predict`` shape: ``fit`` sees only the training split.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from sklearn.decomposition import PCA

__all__ = ["CategoryMeanBaseline", "MeanMapBaseline", "PCABaseline"]


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

    def predict(self, maps: np.ndarray) -> np.ndarray:
        """Reconstruction of each map from its first ``n_components`` scores (not clipped)."""
        if self.pca is None:
            raise RuntimeError("PCABaseline.predict called before fit")
        return self.pca.inverse_transform(self.pca.transform(maps)).astype(np.float32)

    @property
    def explained_variance_ratio(self) -> float:
        return float(self.pca.explained_variance_ratio_.sum()) if self.pca is not None else float("nan")


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
