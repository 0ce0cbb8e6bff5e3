"""Unseen combinations (NeuroQuery's protocol): predict a pair of terms no training study used together.

For about ten pairs of NeuroQuery terms that co-occur in a band of the training studies with text (by
default 4–15 % of them: the issue's 300–1,000 of the full database's ~7,000 training studies with text),
every training study using both terms is removed; the model's conditional-mean path and NeuroQuery are
refitted on the reduced training split (the path's penalty chosen on validation studies without the pair
either), each predicts the query "term1 term2", and the prediction is correlated with the removed studies'
mean map. Beside them: the same two predictors fitted with the pair seen (an upper reference: what the
removed studies add), and the reduced training mean map (the trivial answer the protocol must beat). MA maps
share a strong common pattern, so the mean map alone correlates well with any target: each r is also given
with the reduced training mean map subtracted from prediction and target (``specific``: what the prediction
says about the pair beyond the average study; the mean map scores 0 there). Terms used by more than
``MAX_TERM_SHARE`` of the studies ("cortex", "group") are not paired: they name no topic.

What stays fitted on every study: the networks' encoder and decoder (the conditional-mean path alone gives
the model's text prediction), the LDA topics the model's words rule reads (text only, no maps) and the
tf-idf's idf (the dataset's, from the whole training split).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cbvae_ext.evaluation.columns import MEAN_MAP, MODEL, NEUROQUERY
from cbvae_ext.evaluation.criteria import floor_criterion
from cbvae_ext.evaluation.metrics import pearson_r
from cbvae_ext.evaluation.section import EvalData, Section

__all__ = ["MAX_TERM_SHARE", "UNSEEN_BAND", "choose_pairs", "unseen_pairs_section"]

#: Co-occurrence band of a pair: shares of the training studies with text (NeuroQuery's 300–1,000 studies).
UNSEEN_BAND = (0.04, 0.15)
#: A term in more than this share of the training studies with text ("cortex", "group") names no topic.
MAX_TERM_SHARE = 0.3


def _words(term: str) -> frozenset[str]:
    return frozenset(term.split())


def choose_pairs(
    present: Any,
    vocabulary: list[str],
    eligible: np.ndarray,
    band: tuple[int, int],
    n_pairs: int,
    rng: np.random.Generator,
    max_count: int | None = None,
) -> list[tuple[int, int, int]]:
    """Seeded pairs ``(term a, term b, studies using both)`` with a co-occurrence count inside ``band``.

    Args:
        present: ``[n_studies, n_terms]`` sparse 0/1 matrix (the term occurs in the study).
        vocabulary: term names (a pair whose terms share a word, "memory" and "working memory", is skipped).
        eligible: ``[n_terms]`` bool, terms both predictors can read.
        band: lowest and highest number of studies using both terms.
        n_pairs: pairs wanted; each term is used in one pair at most, so the pairs differ.
        rng: the section's stream.
        max_count: terms used by more studies are left out (None: no limit).
    """
    counts = np.asarray(present.sum(axis=0)).ravel()
    cand = np.flatnonzero(eligible & (counts >= band[0]) & (counts <= (max_count or counts.max())))
    if len(cand) < 2:
        return []
    sub = present[:, cand].astype(np.float64)
    co = np.asarray((sub.T @ sub).todense())
    a, b = np.nonzero(np.triu((co >= band[0]) & (co <= band[1]), k=1))
    order = rng.permutation(len(a))
    used: set[int] = set()
    pairs: list[tuple[int, int, int]] = []
    for k in order:
        i, j = int(cand[a[k]]), int(cand[b[k]])
        if i in used or j in used or _words(vocabulary[i]) & _words(vocabulary[j]):
            continue
        pairs.append((i, j, int(co[a[k], b[k]])))
        used.update((i, j))
        if len(pairs) == n_pairs:
            break
    return pairs


def _r(pred: np.ndarray, target: np.ndarray, centre: np.ndarray | None = None) -> float:
    """Pearson r of two maps; with ``centre``, of their differences from it (a prediction equal to it: r 0)."""
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    if centre is not None:
        pred, target = pred - centre, target - centre
    value = pearson_r(pred[None], target[None])[0]
    return float(value) if np.isfinite(value) else (0.0 if centre is not None else float("nan"))


def _nanmedian(values: np.ndarray) -> float | None:
    return float(np.nanmedian(values)) if np.isfinite(values).any() else None


def _above(medians: dict[str, float | None], rule: str) -> dict[str, Any]:
    a, b = medians[MODEL], medians[NEUROQUERY]
    return floor_criterion(None if a is None or b is None else a - b, 0.0, rule, None)


def unseen_pairs_section(data: EvalData) -> Section:
    """Term pairs removed from training, predicted by the refitted model path and NeuroQuery.

    Reads ``data.cache["neuroquery"]`` (terms, the fitted NeuroQuery, the training rows of ``terms.npz``), ``data.cache["title_model"]``
    and ``data.cache["topic_vocabulary"]`` (the model's words rule, ``models_section``); option
    ``n_unseen_pairs`` (0: absent).
    """
    from cbvae_ext.evaluation.text_protocols import NeuroQueryBaseline, title_tfidf
    from cbvae_ext.networks.conditioning import initialise_from_data

    n_wanted = int(data.opts.get("n_unseen_pairs", 10))
    nq, rule = data.cache.get("neuroquery"), data.cache.get("title_model")
    if n_wanted == 0:
        return Section("unseen_pairs", {"absent": "switched off (--n_unseen_pairs 0)"})
    if nq is None or rule is None or MODEL not in data.runs:
        return Section(
            "unseen_pairs",
            {"absent": "needs the NeuroQuery baseline (terms.npz) and a --run_dir with topic weights (the words rule)"},
        )
    run = data.runs[MODEL]
    path = getattr(run.model, "cond_mean", None)
    if path is None or not path.rank:
        return Section("unseen_pairs", {"absent": "the run has no conditional-mean path to refit"})
    terms, train_rows, vocabulary = nq["terms"], nq["train_rows"], data.cache["topic_vocabulary"]
    has_text = terms.observed[train_rows]
    present = (terms.tfidf[train_rows[has_text]] > 0).astype(np.int8).tocsc()
    # a term counts for both predictors only when the words rule finds a topic for it (the same pairs whether
    # or not the run also reads the terms themselves)
    eligible = np.array([vocabulary is not None and not vocabulary.match(t).empty for t in terms.vocabulary])
    n_text = int(has_text.sum())
    band = (max(2, int(np.ceil(UNSEEN_BAND[0] * n_text))), max(2, int(UNSEEN_BAND[1] * n_text)))
    pairs = choose_pairs(
        present, terms.vocabulary, eligible, band, n_wanted, data.rng("unseen_pairs"), int(MAX_TERM_SHARE * n_text)
    )
    if not pairs:
        return Section(
            "unseen_pairs",
            {"absent": f"no pair of terms co-occurs in {band[0]}–{band[1]} of the {n_text} training studies with text"},
        )
    val_rows = data.info.rows("val")
    val_present = terms.tfidf[val_rows] > 0
    saved, alpha = {k: v.clone() for k, v in path.state_dict().items()}, getattr(path, "alpha", None)
    text_rows = np.flatnonzero(has_text)
    rows: list[dict[str, Any]] = []
    try:
        for i, j, n_both in pairs:
            query = f"{terms.vocabulary[i]} {terms.vocabulary[j]}"
            x = title_tfidf([query], terms.vocabulary, terms.idf)
            both = np.zeros(data.train.n, bool)
            both[text_rows[np.asarray((present[:, i].multiply(present[:, j])).todense()).ravel() > 0]] = True
            target = data.train.maps[both].mean(axis=0)
            seen = {MODEL: rule([query])[0][0], NEUROQUERY: nq["model"].predict(x)[0]}
            keep = ~both
            val_keep = ~np.asarray(val_present[:, i].multiply(val_present[:, j]).todense()).ravel().astype(bool)
            initialise_from_data(
                run.model, data.info.path, seed=int(data.opts["seed"]),
                rows={"train": train_rows[keep], "val": val_rows[val_keep]},
            )  # fmt: skip
            unseen_model = rule([query])[0][0]
            fit = keep & has_text
            unseen_nq = NeuroQueryBaseline().fit(terms.tfidf[train_rows[fit]], data.train.maps[fit]).predict(x)[0]
            mean_map = data.train.maps[keep].mean(axis=0)
            preds = {
                MODEL: unseen_model,
                NEUROQUERY: unseen_nq,
                MEAN_MAP: mean_map,
                f"{MODEL}_seen": seen[MODEL],
                f"{NEUROQUERY}_seen": seen[NEUROQUERY],
            }
            rows.append(
                {
                    "terms": [terms.vocabulary[i], terms.vocabulary[j]],
                    "n_removed": int(both.sum()),
                    "n_cooccur_with_text": n_both,
                    **{k: _r(v, target) for k, v in preds.items()},
                    "specific": {k: _r(v, target, mean_map) for k, v in preds.items() if k != MEAN_MAP},
                }
            )
    finally:
        with torch.no_grad():
            path.load_state_dict(saved)
        path.alpha = alpha
    names = (MODEL, NEUROQUERY, MEAN_MAP, f"{MODEL}_seen", f"{NEUROQUERY}_seen")
    per = {k: np.array([row[k] for row in rows]) for k in names}
    specific = {k: np.array([row["specific"][k] for row in rows]) for k in names if k != MEAN_MAP}
    medians = {k: _nanmedian(v) for k, v in per.items()}
    specific_medians = {k: _nanmedian(v) for k, v in specific.items()}
    results: dict[str, Any] = {
        "rule": "pairs of terms co-occurring in the band; every training study with both removed; the model's "
        "conditional-mean path and NeuroQuery refitted without them predict 'term1 term2'; r with the removed "
        "studies' mean map",
        "band": {"shares": list(UNSEEN_BAND), "studies": list(band), "of_training_studies_with_text": n_text},
        "n_pairs": len(rows),
        "pairs": rows,
        "median_r": medians,
        "specific": {
            "rule": "r of prediction and target after subtracting the reduced training mean map from both (what is "
            "specific to the pair; the mean map itself scores 0)",
            "median_r": specific_medians,
            "model_vs_neuroquery": data.paired(specific[MODEL], specific[NEUROQUERY]),
        },
        "model_vs_neuroquery": data.paired(per[MODEL], per[NEUROQUERY]),
        "model_vs_mean_map": data.paired(per[MODEL], per[MEAN_MAP]),
    }
    results["criteria"] = {
        "unseen_pairs_above_neuroquery": _above(
            medians,
            "unseen pairs: median r of the model (path refitted without the pair) minus NeuroQuery's (refitted on "
            "the same reduced split) >= 0",
        ),
        "unseen_pairs_specific_above_neuroquery": _above(
            specific_medians,
            "unseen pairs, the reduced training mean map subtracted from prediction and target: median r of the "
            "model minus NeuroQuery's >= 0",
        ),
    }
    return Section("unseen_pairs", results)
