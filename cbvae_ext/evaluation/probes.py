"""Post-hoc probes of what frozen posterior means μ still say about publication year.

The adversarial year head sitting at chance does not prove the information is gone: a fresh probe
trained after the fact on the frozen codes is the evidence. Each probe is fit on the training split,
scored on the test split (balanced accuracy over year bins), and compared with a permutation null made
by refitting the same probe on shuffled training labels.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import balanced_accuracy_score, r2_score
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

__all__ = ["adversary_balanced_accuracy", "make_probes", "probe_with_null", "year_probes", "year_r2"]


def make_probes(seed: int = 0, mlp_max_iter: int = 300) -> dict[str, Pipeline]:
    """The two probes, each on standardised μ: multinomial logistic regression and a one-hidden-layer MLP."""
    return {
        "logistic": make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
        "mlp": make_pipeline(
            StandardScaler(),
            MLPClassifier(hidden_layer_sizes=(64,), max_iter=mlp_max_iter, early_stopping=True, random_state=seed),
        ),
    }


def probe_with_null(
    probe: Pipeline,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    n_permutations: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit ``probe`` on train, score balanced accuracy on test, and build its permutation null.

    Returns:
        ``balanced_accuracy``, ``null`` (``mean``, ``p95``, ``values``), ``p_value`` (with the +1 correction),
        ``above_chance`` (p < 0.05), ``n_train``, ``n_test``, ``n_classes``, ``n_permutations`` and
        ``predictions`` (the probe's test predictions, an array: pop it before writing JSON).
    """
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():
        # shuffled labels carry nothing to converge to; the null needs the fit, not convergence
        warnings.simplefilter("ignore", ConvergenceWarning)
        # small test splits need not hold every year bin a probe predicts; balanced accuracy is still defined
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        predictions = clone(probe).fit(x_train, y_train).predict(x_test)
        score = balanced_accuracy_score(y_test, predictions)
        null = np.array(
            [
                balanced_accuracy_score(y_test, clone(probe).fit(x_train, rng.permutation(y_train)).predict(x_test))
                for _ in range(n_permutations)
            ]
        )
    p_value = (1 + int((null >= score).sum())) / (1 + n_permutations)
    return {
        "balanced_accuracy": float(score),
        "null": {
            "mean": float(null.mean()) if null.size else None,
            "p95": float(np.quantile(null, 0.95)) if null.size else None,
            "values": [float(v) for v in null],
        },
        "p_value": float(p_value),
        "above_chance": bool(p_value < 0.05),
        "n_train": int(len(y_train)),
        "n_test": int(len(y_test)),
        "n_classes": int(np.unique(y_train).size),
        "n_permutations": int(n_permutations),
        "predictions": np.asarray(predictions),
    }


def year_probes(
    mu_train: np.ndarray,
    bins_train: np.ndarray,
    mu_test: np.ndarray,
    bins_test: np.ndarray,
    n_permutations: int = 100,
    n_permutations_mlp: int | None = None,
    seed: int = 0,
    mlp_max_iter: int = 300,
) -> dict[str, Any]:
    """Logistic and MLP year-bin probes on frozen μ with their permutation nulls.

    Rows with a missing year (bin ``-1``) are dropped.

    Args:
        mu_train: ``[N, L]`` training posterior means.
        bins_train: year bin per training row.
        mu_test: ``[M, L]`` test posterior means.
        bins_test: year bin per test row.
        n_permutations: permutations of the logistic probe's null.
        n_permutations_mlp: permutations of the MLP probe's null (default: ``n_permutations``).
        seed: seed of the permutations and of the MLP.
        mlp_max_iter: MLP epochs (early stopping on a 10% validation split).
    """
    tr, te = np.asarray(bins_train) >= 0, np.asarray(bins_test) >= 0
    if np.unique(np.asarray(bins_train)[tr]).size < 2 or te.sum() == 0:
        return {"skipped": "fewer than two year bins in train or no dated test study"}
    n_perm = {"logistic": n_permutations, "mlp": n_permutations if n_permutations_mlp is None else n_permutations_mlp}
    return {
        name: probe_with_null(
            probe, mu_train[tr], bins_train[tr], mu_test[te], bins_test[te], n_perm[name], seed=seed + i
        )
        for i, (name, probe) in enumerate(make_probes(seed, mlp_max_iter).items())
    }


def year_r2(mu_train: np.ndarray, year_train: np.ndarray, mu_test: np.ndarray, year_test: np.ndarray) -> float | None:
    """Test R² of a ridge regression from standardised μ to raw publication year (NaN years dropped)."""
    tr, te = np.isfinite(year_train), np.isfinite(year_test)
    if tr.sum() < 2 or te.sum() < 2:
        return None
    model = make_pipeline(StandardScaler(), Ridge(alpha=1.0)).fit(mu_train[tr], year_train[tr])
    return float(r2_score(year_test[te], model.predict(mu_test[te])))


def adversary_balanced_accuracy(year_logits: np.ndarray, bins: np.ndarray) -> float | None:
    """Balanced accuracy of the model's own adversarial year head on dated rows (None if none)."""
    ok = np.asarray(bins) >= 0
    if not ok.any():
        return None
    return float(balanced_accuracy_score(np.asarray(bins)[ok], np.asarray(year_logits)[ok].argmax(axis=1)))
