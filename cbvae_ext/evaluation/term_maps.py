"""Maps of terms a scientist types: the model's words rule beside NeuroQuery and the studies that use the term.

python -m cbvae_ext.evaluation.term_maps --run_dir RUN --dataset_dir DATA --out term_maps.png [--terms "pain,reward"]

For each term, four maps (``term_maps.png``, one row per term, drawn like ``category_maps.png``):

- the C-β-VAE's conditional-mean map of the words alone, by the title-only protocol's words rule
  (``TopicVocabulary.match``: the words -> LDA topic weights, and NeuroQuery's terms embedded where the run has a
  terms group; every other condition missing);
- NeuroQuery (``NeuroQueryBaseline``) fitted on the training studies with text, queried with the same words;
- the mean map of the held-out (test) studies whose text uses the term: the target;
- the mean map of the training studies that use it: the literature both predictors learnt from.

It prints, per term, each map's Pearson r with the held-out mean, beside the training mean map of all studies
(the trivial answer: MA maps share a strong common pattern). A study "uses" a term when its NeuroQuery tf-idf
has the term's phrase (the query's rarest recognised phrase). Bad input ends in one ``error:`` line (exit 2).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cbvae_ext.errors import CbvaeError
from cbvae_ext.evaluation.metrics import pearson_r

__all__ = ["DEFAULT_TERMS", "TermMaps", "TermMapsError", "main", "term_maps"]

#: Terms of distinct systems, each in NeuroQuery's vocabulary and used by hundreds of Neurosynth studies.
DEFAULT_TERMS = ("pain", "reward", "working memory", "face", "motor", "language", "fear", "auditory")

MODEL_COLUMN = "C-β-VAE (words)"
NEUROQUERY_COLUMN = "NeuroQuery"
HELDOUT_COLUMN = "held-out studies using it"
TRAINING_COLUMN = "training studies using it"
ALL_STUDIES = "training mean map (all studies)"


class TermMapsError(CbvaeError, ValueError):
    """A run, dataset or term the term maps cannot be drawn from."""


@dataclass
class TermMaps:
    """The maps of each term (in-mask voxels, ``[n_terms, V]`` per column) and their r with the held-out mean.

    Attributes:
        terms: the terms, in row order.
        columns: column title -> ``[n_terms, V]`` in-mask maps (NaN rows: a mean over no study).
        n_train: training studies using each term.
        n_test: held-out studies using each term.
        r: column title (and ``ALL_STUDIES``, the training mean map) -> ``[n_terms]`` r with the held-out mean.
        recognised: whether the model's words rule recognised each term (else every condition is missing).
    """

    terms: list[str]
    columns: dict[str, np.ndarray]
    n_train: np.ndarray
    n_test: np.ndarray
    r: dict[str, np.ndarray] = field(default_factory=dict)
    recognised: list[bool] = field(default_factory=list)

    def markdown(self) -> str:
        """One row per term: studies using it and each map's r with the held-out mean."""
        names = list(self.r)
        lines = [
            "| term | training studies | held-out studies | " + " | ".join(f"r: {n}" for n in names) + " |",
            "| --- | --- | --- | " + " | ".join("---" for _ in names) + " |",
        ]
        for i, term in enumerate(self.terms):
            cells = [f"{self.r[n][i]:.3f}" if np.isfinite(self.r[n][i]) else "—" for n in names]
            shown = term if self.recognised[i] else f"{term} (not recognised by the words rule)"
            lines.append(f"| {shown} | {self.n_train[i]} | {self.n_test[i]} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _term_columns(query: Any, terms: Sequence[str]) -> list[int]:
    """Each term's tf-idf column: its rarest recognised phrase (the highest idf weight of its query row)."""
    cols = []
    for i, term in enumerate(terms):
        row = query.getrow(i)
        if row.nnz == 0:
            raise TermMapsError(
                f"term {term!r} is not in NeuroQuery's vocabulary (the dataset's terms.npz); give another with "
                f"--terms, e.g. {', '.join(DEFAULT_TERMS[:3])}"
            )
        cols.append(int(row.indices[np.argmax(row.data)]))
    return cols


def _mean_rows(maps: np.ndarray, uses: np.ndarray) -> np.ndarray:
    """``[n_terms, V]`` mean of the maps each term's studies (columns of ``uses``) hold; NaN for none."""
    out = np.full((uses.shape[1], maps.shape[1]), np.nan, np.float32)
    for t in range(uses.shape[1]):
        if uses[:, t].any():
            out[t] = maps[uses[:, t]].mean(axis=0)
    return out


def _words_rule(model: Any, terms: Sequence[str], mask: np.ndarray) -> tuple[np.ndarray, list[bool]]:
    """The title-only protocol's words rule: topic weights of the words (and the terms embedding), then the conditional mean."""
    from cbvae_ext.app.words import TopicVocabulary

    schema = model.schema
    vocabulary = TopicVocabulary(schema.topic_keys, schema.topic_names) if schema.topic_keys else None
    maps, recognised = [], []
    for term in terms:
        conditions: dict[str, Any] = {}
        match = vocabulary.match(term) if vocabulary is not None else None
        if match is not None and not match.empty:
            conditions["topics"] = match.weights
        embedded = model.text_terms(term)
        if embedded is not None:
            conditions["terms"] = embedded
        recognised.append(bool(conditions))
        maps.append(model.conditional_mean(conditions).map[mask])
    return np.stack(maps).astype(np.float32), recognised


def term_maps(
    run_dir: str | Path, dataset_dir: str | Path, terms: Sequence[str] = DEFAULT_TERMS, neuroquery: bool = True
) -> tuple[TermMaps, np.ndarray, np.ndarray]:
    """The term maps of a C-β-VAE run on its dataset.

    Args:
        run_dir: a C-β-VAE run folder with a conditional-mean path.
        dataset_dir: the dataset it was trained on, built with NeuroQuery's terms (``terms.npz``).
        terms: the words, one query each.
        neuroquery: fit NeuroQuery on the training studies with text (slow on the full database: unfinished after
            21 min of CPU on 2 cores; ``--no-neuroquery`` leaves it out).

    Returns:
        ``(TermMaps, mask [D, H, W] bool, affine)``.

    Raises:
        TermMapsError: no terms, a run without a conditional-mean path or of another grid, a dataset
            without terms, a term outside NeuroQuery's vocabulary.
    """
    terms = [t.strip() for t in terms if t and t.strip()]
    if not terms:
        raise TermMapsError("no terms given; pass --terms 'pain,reward' (comma-separated)")
    # imported after the checks of the arguments alone: they take seconds (torch, MONAI)
    from cbvae_ext import inference
    from cbvae_ext.data import load_dataset_info
    from cbvae_ext.data.neuroquery import load_terms, texts_tfidf
    from cbvae_ext.evaluation.passes import load_split
    from cbvae_ext.evaluation.text_protocols import NeuroQueryBaseline

    info = load_dataset_info(dataset_dir)
    mask = np.asarray(info.mask) != 0
    model = inference.load(run_dir)
    if not model.has_conditional_mean:
        raise TermMapsError(
            f"run {run_dir} has no conditional-mean path; give a C-β-VAE run (bundle/configs/train.yaml)"
        )
    if model.mask.shape != mask.shape or not np.array_equal(model.mask, mask):
        raise TermMapsError(
            f"run {run_dir} was trained on another grid or mask than {dataset_dir}; give its own dataset"
        )
    text = load_terms(info.path)
    if text is None:
        raise TermMapsError(f"{dataset_dir} has no terms.npz; rebuild it with python -m cbvae_ext.data build --terms")
    query = texts_tfidf(terms, text.vocabulary, text.idf)
    cols = _term_columns(query, terms)
    train_rows, test_rows = info.rows("train"), info.rows("test")
    uses = text.tfidf[:, cols].toarray() > 0  # [N, n_terms]: the study's text has the term's phrase
    train, test = load_split(info, train_rows), load_split(info, test_rows)
    columns: dict[str, np.ndarray] = {}
    columns[MODEL_COLUMN], recognised = _words_rule(model, terms, mask)
    if neuroquery:
        has = text.observed[train_rows]
        nq = NeuroQueryBaseline().fit(text.tfidf[train_rows[has]], train.maps[has])
        columns[NEUROQUERY_COLUMN] = nq.predict(query)
    columns[HELDOUT_COLUMN] = _mean_rows(test.maps, uses[test_rows])
    columns[TRAINING_COLUMN] = _mean_rows(train.maps, uses[train_rows])
    target = columns[HELDOUT_COLUMN]
    found = np.isfinite(target).all(axis=1)
    predictors = {n: m for n, m in columns.items() if n != HELDOUT_COLUMN}
    predictors[ALL_STUDIES] = np.broadcast_to(train.maps.mean(axis=0), target.shape)  # the trivial answer
    r: dict[str, np.ndarray] = {}
    for name, pred in predictors.items():
        r[name] = np.full(len(terms), np.nan)
        ok = found & np.isfinite(pred).all(axis=1)
        if ok.any():
            r[name][ok] = pearson_r(pred[ok], target[ok])
    result = TermMaps(
        terms, columns, uses[train_rows].sum(axis=0), uses[test_rows].sum(axis=0), r, recognised
    )  # fmt: skip
    return result, mask, np.asarray(info.affine)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: draw ``--out`` and print the table; one ``error:`` line and exit 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="python -m cbvae_ext.evaluation.term_maps", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--run_dir", required=True, help="C-β-VAE run folder")
    parser.add_argument("--dataset_dir", required=True, help="its dataset folder, built with --terms")
    parser.add_argument("--out", required=True, help="PNG to write (term_maps.png)")
    parser.add_argument("--terms", default=",".join(DEFAULT_TERMS), help="comma-separated terms (default: %(default)s)")
    parser.add_argument(
        "--no-neuroquery", action="store_true", help="leave NeuroQuery out (it is fitted on every study with text)"
    )
    args = parser.parse_args(argv)
    try:
        maps, mask, affine = term_maps(args.run_dir, args.dataset_dir, args.terms.split(","), not args.no_neuroquery)
        from cbvae_ext.evaluation.figures import plot_category_maps

        labels = [f"{t}\n(train {a}, test {b})" for t, a, b in zip(maps.terms, maps.n_train, maps.n_test, strict=True)]
        shown = {k: np.nan_to_num(v) for k, v in maps.columns.items()}
        path = plot_category_maps(shown, mask, affine, labels, args.out)
    except CbvaeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(maps.markdown())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
