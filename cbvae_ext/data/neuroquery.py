"""NeuroQuery's term counts as a per-study text condition: read, join to the maps by PubMed id, tf-idf, embed.

NeuroQuery (Dockès et al., 2020) counts its 7,547 curated terms in the abstract, title and keywords of
13,459 articles (``../shared/data/neuroquery``, BSD-3; NiMARE's ``fetch_neuroquery`` downloads the same
files). 8,682 of them are Neurosynth v7 studies: the join key is the PubMed id (our ids are
``neurosynth:<pmid>``; NiMARE's converted datasets use ``<pmid>-<n>``, both are accepted). NeuroQuery
contributes text only: the maps, split and duplicate grouping stay Neurosynth's.

The tf-idf follows NeuroQuery's own ``TextVectorizer``: counts summed over the three sources, each phrase
also counted for its words (``neuroquery.tokenization.unigram_operator``; the stored counts match
longest phrases only), times ``idf = 1 - log(document frequency)`` with the document frequency taken on
the **training** studies that have text, rows l2-normalised. A study without text has an empty row and
``observed`` False: nothing is invented. The dataset folder stores it as ``terms.npz``
(``bundle/docs/formats.md``), with the idf and the vocabulary, so a query can be put on the same scale.

The condition the network sees is a low-dimensional **embedding** of that tf-idf (``TermEmbedding``), fitted
on the training studies with text and each dimension standardised on them, one of ``TERM_EMBEDDINGS``:

- ``"svd"``: the truncated SVD of the tf-idf (unsupervised: what the texts vary in);
- ``"neuroquery"``: NeuroQuery's own estimator (``neuroquery.smoothed_regression.SmoothedRegression``)
  predicting the map from the tf-idf, read as the map's first principal coordinates (a training PCA):
  what the text says about the map. Its prediction is affine in the tf-idf, so it is read back as one matrix.
  A training study's stored value is **cross-fitted** (predicted by a regression fitted without its
  fold of study groups), so the networks fitted on it see text predictions as good as a new study's,
  not ones that have seen its own map;
- ``"neuroquery-residual"``: the same, fitted to what the other conditions do not explain (the training
  maps minus a ridge on topics, task and the continuous fields, its penalty by validation MSE; the builder's
  ``condition_residual``). The maps' first principal coordinates are mostly what the topics already say,
  but on full-v7 validation this build's group raised the path's peak AUC only +0.003 (the maps' +0.004),
  where the same regression of the path's own residual, fitted on its principal coordinates, raised it
  +0.011 (``architecture.md``, "What the embedding must be fitted on").

Each is linear, so a typed query (``TextEmbedder.embed_counts``) goes through exactly the map a new
study's text does, and ``terms.npz`` carries it (``components``, ``offset``; ``crossfit``) for the app
and the export, which need neither sklearn nor the corpus.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse

from .errors import DataError

__all__ = [
    "ENV_VAR",
    "CROSSFIT_FOLDS",
    "TERM_EMBEDDINGS",
    "NEUROQUERY_FILES",
    "TERMS_FILE",
    "NeuroQueryText",
    "TermEmbedding",
    "Terms",
    "TextEmbedder",
    "build_terms",
    "fast_ridge_gcv",
    "fit_embedding",
    "fit_supervised_embedding",
    "fetch_neuroquery_dir",
    "join_text",
    "load_terms",
    "neuroquery_checksums",
    "pmid_of",
    "read_neuroquery",
    "resolve_neuroquery_dir",
    "save_terms",
    "texts_tfidf",
    "tfidf",
    "weigh",
]

logger = logging.getLogger(__name__)

#: Environment variable naming a local copy of the NeuroQuery files.
ENV_VAR = "CBVAE_NEUROQUERY_DIR"
#: Dataset-folder file of the term tf-idf.
TERMS_FILE = "terms.npz"
_NQ = "data-neuroquery_version-1_"
#: The files read (NiMARE's ``fetch_neuroquery`` layout; the counts of each text source).
NEUROQUERY_FILES = {
    "metadata": _NQ + "metadata.tsv.gz",
    "vocabulary": _NQ + "vocab-neuroquery7547_vocabulary.txt",
    **{src: f"{_NQ}vocab-neuroquery7547_source-{src}_type-count_features.npz" for src in ("abstract", "title", "keywords")},
}  # fmt: skip
_SOURCES = ("abstract", "title", "keywords")
#: How the text embedding is fitted (see the module docstring); the first is the default.
TERM_EMBEDDINGS = ("svd", "neuroquery", "neuroquery-residual")
#: Folds of study groups behind the cross-fitted training values of the ``"neuroquery"`` embedding.
CROSSFIT_FOLDS = 5


@dataclass
class NeuroQueryText:
    """NeuroQuery's articles: PubMed ids (str) and term counts ``[n_articles, n_terms]`` (abstract + title + keywords)."""

    pmids: np.ndarray
    counts: scipy.sparse.csr_matrix
    vocabulary: list[str]


@dataclass
class Terms:
    """A dataset folder's ``terms.npz``.

    Attributes:
        tfidf: ``[N, n_terms]`` CSR float32, row ``i`` for map ``i`` (empty where ``observed`` is False).
        observed: ``[N]`` bool, the study has NeuroQuery text.
        idf: ``[n_terms]`` the training split's idf (``1 - log(df)``).
        vocabulary: the terms, column order.
        embedding: the training split's text embedding (None: built without one).
        crossfit: ``[N, dims]`` float32, a row's stored embedding where it is not ``embedding.embed`` of its
            tf-idf (the cross-fitted training rows of a supervised embedding), NaN elsewhere; None: none.
    """

    tfidf: scipy.sparse.csr_matrix
    observed: np.ndarray
    idf: np.ndarray
    vocabulary: list[str]
    embedding: TermEmbedding | None = None
    crossfit: np.ndarray | None = None

    def embedder(self) -> TextEmbedder:
        """What a query needs to be embedded like a study's text (no per-study rows)."""
        return TextEmbedder(self._embedding(), np.asarray(self.idf, np.float64), list(self.vocabulary))

    def embedded(self) -> np.ndarray:
        """``[N, dims]`` embedding of every map's text, NaN rows where the study has none (missing, not zero)."""
        out = self._embedding().embed(self.tfidf)
        if self.crossfit is not None:
            fitted = np.isfinite(self.crossfit).all(axis=1)
            out[fitted] = self.crossfit[fitted]
        out[~self.observed] = np.nan
        return out

    def _embedding(self) -> TermEmbedding:
        if self.embedding is None:
            raise DataError("terms.npz has no text embedding; rebuild the dataset with --term-dims > 0")
        return self.embedding


@dataclass
class TermEmbedding:
    """A linear text embedding: ``tfidf @ components - offset`` (a truncated SVD, standardised on train).

    Attributes:
        components: ``[n_terms, dims]`` float32.
        offset: ``[dims]`` float32.
    """

    components: np.ndarray
    offset: np.ndarray

    @property
    def dims(self) -> int:
        return int(self.components.shape[1])

    def embed(self, tfidf_rows: scipy.sparse.spmatrix | np.ndarray) -> np.ndarray:
        """``[n, dims]`` float64 embedding of tf-idf rows (l2-normalised, as ``tfidf`` makes them)."""
        return np.asarray(tfidf_rows @ self.components, dtype=np.float64) - self.offset


@dataclass
class TextEmbedder:
    """Recognised NeuroQuery terms to the ``terms`` condition: counts, tf-idf with the training idf, embedding.

    Attributes:
        embedding: the training split's ``TermEmbedding``.
        idf: ``[n_terms]`` the training idf.
        vocabulary: NeuroQuery's terms, in column order (the tokeniser's normalised spelling).
    """

    embedding: TermEmbedding
    idf: np.ndarray
    vocabulary: list[str]

    def __post_init__(self) -> None:
        self._column = {t: i for i, t in enumerate(self.vocabulary)}

    def embed_terms(self, terms: Sequence[str]) -> np.ndarray | None:
        """``[dims]`` embedding of a text's recognised terms (repeats count); None when none is in the vocabulary."""
        counts = np.zeros(len(self.vocabulary))
        for t in terms:
            if t in self._column:
                counts[self._column[t]] += 1.0
        if not counts.any():
            return None
        return self.embed_counts(counts)

    def embed_counts(self, counts: np.ndarray) -> np.ndarray:
        """``[dims]`` embedding of one text's term counts (``[n_terms]``), weighed as a study's text was."""
        row = weigh(scipy.sparse.csr_matrix(np.asarray(counts, np.float64).reshape(1, -1)), self.idf, self.vocabulary)
        return self.embedding.embed(row)[0]

    def embed_texts(self, texts: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """``([n, dims] embeddings, [n] bool recognised)`` of free texts (``texts_tfidf``); rows without a
        recognised term are NaN (missing)."""
        x = texts_tfidf(texts, self.vocabulary, self.idf)
        found = np.asarray(x.getnnz(axis=1)) > 0
        out = np.full((len(texts), self.embedding.dims), np.nan)
        if found.any():
            out[found] = self.embedding.embed(x[found])
        return out, found

    def save(self, path: str | Path) -> None:
        """Write the embedder as one ``.npz`` (no pickles); ``replace_atomically`` makes it atomic."""
        with open(path, "wb") as f:
            np.savez_compressed(
                f,
                components=self.embedding.components,
                offset=self.embedding.offset,
                idf=self.idf,
                vocabulary=np.array(self.vocabulary, dtype=str),
            )

    @classmethod
    def load(cls, path: str | Path) -> TextEmbedder:
        """Read ``save``'s file.

        Raises:
            DataError: unreadable, or arrays that do not fit together.
        """
        try:
            with np.load(path, allow_pickle=False) as z:
                out = cls(TermEmbedding(z["components"], z["offset"]), z["idf"], [str(t) for t in z["vocabulary"]])
        except (OSError, ValueError, KeyError) as err:
            raise DataError(f"{path} is unreadable ({err}); re-export the run") from err
        n = len(out.vocabulary)
        if (
            out.embedding.components.shape[0] != n
            or out.idf.shape != (n,)
            or out.embedding.offset.shape != (out.embedding.dims,)
        ):
            raise DataError(f"{path} has arrays that do not fit together; re-export the run")
        return out


def fit_embedding(tfidf_m: scipy.sparse.csr_matrix, fit: np.ndarray, dims: int, seed: int = 0) -> TermEmbedding:
    """Truncated SVD of the ``fit`` rows' tf-idf, each dimension then centred and scaled to unit sd on them.

    Args:
        tfidf_m: ``[N, n_terms]`` l2-normalised tf-idf.
        fit: ``[N]`` bool, the rows to fit on (training studies with text).
        dims: embedding size; at most one less than the fitted rows (and than the terms).
        seed: the randomised SVD's seed.

    Raises:
        DataError: fewer than 3 rows to fit on.
    """
    from sklearn.decomposition import TruncatedSVD

    x = tfidf_m[np.asarray(fit, bool)]
    dims = min(int(dims), x.shape[0] - 1, x.shape[1] - 1)
    if dims < 2:
        raise DataError(f"{x.shape[0]} training studies have text: too few for a text embedding; build without terms")
    svd = TruncatedSVD(n_components=dims, algorithm="randomized", n_iter=7, random_state=seed).fit(x)
    return _standardised(svd.components_.T, np.zeros(dims), np.asarray(x @ svd.components_.T, dtype=np.float64))[0]


def _standardised(weights: np.ndarray, bias: np.ndarray, values: np.ndarray) -> tuple[TermEmbedding, np.ndarray]:
    """The affine map ``x @ weights + bias`` rescaled so that ``values`` (what the training rows store) have mean 0
    and sd 1 per dimension; returns the embedding and the rescaled ``values``."""
    centre, scale = values.mean(axis=0), values.std(axis=0)
    scale[scale <= 0] = 1.0
    embedding = TermEmbedding((weights / scale).astype(np.float32), ((centre - bias) / scale).astype(np.float32))
    return embedding, (values - centre) / scale


def fit_supervised_embedding(
    tfidf_m: scipy.sparse.csr_matrix,
    fit: np.ndarray,
    maps: np.ndarray,
    groups: np.ndarray,
    dims: int,
    folds: int = CROSSFIT_FOLDS,
    seed: int = 0,
) -> tuple[TermEmbedding, np.ndarray]:
    """NeuroQuery's ``SmoothedRegression`` from the tf-idf to the maps, read as the maps' first ``dims`` principal
    coordinates (a PCA of the fit rows' maps).

    Args:
        tfidf_m: ``[N, n_terms]`` l2-normalised tf-idf.
        fit: ``[N]`` bool, the rows to fit on (training studies with text).
        maps: ``[n_fit, n_voxels]`` the fit rows' maps, scaled as the networks read them.
        groups: ``[n_fit]`` study group of each fit row (a group's maps share a fold).
        dims: embedding size (principal coordinates); at most one less than the fitted rows.
        folds: folds of the cross-fit.
        seed: the PCA's seed.

    Returns:
        The embedding of the regression fitted on every fit row (linear in the tf-idf), and the
        ``[n_fit, dims]`` cross-fitted embedding of the fit rows (each from the fold model without it).

    Raises:
        DataError: too few rows or study groups to fit and cross-fit on.
    """
    from neuroquery.smoothed_regression import SmoothedRegression
    from sklearn.decomposition import PCA
    from sklearn.model_selection import GroupKFold
    from tqdm.auto import tqdm

    x = tfidf_m[np.asarray(fit, bool)]
    dims = min(int(dims), x.shape[0] - 1, np.asarray(maps).shape[1] - 1)
    folds = min(int(folds), len(np.unique(groups)))
    if dims < 2 or folds < 2:
        raise DataError(f"{x.shape[0]} training studies have text: too few for a text embedding; build without terms")
    # NeuroQuery's own protocol (tf-idf -> voxels: its feature selection assumes a term raises activity),
    # read through the training maps' principal coordinates
    pca = PCA(dims, svd_solver="randomized", random_state=seed).fit(maps)

    def regression(rows: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        # the library prints the number of selected terms; the build logs its own progress
        with contextlib.redirect_stdout(io.StringIO()), fast_ridge_gcv():
            model = SmoothedRegression(n_components=min(300, len(rows) - 1)).fit(x[rows], maps[rows])
        return lambda q: pca.transform(model.predict(q))

    crossfit = np.zeros((x.shape[0], dims))
    splits = list(GroupKFold(folds).split(crossfit, groups=groups))
    for kept, out in tqdm(splits, desc="cross-fitting NeuroQuery's text regression"):
        crossfit[out] = regression(kept)(x[out].toarray())
    weights, bias = _linearised(regression(np.arange(x.shape[0])), x.shape[1])
    return _standardised(weights, bias, crossfit)


def _gcv_without_hat(U: np.ndarray, s: np.ndarray, Y: np.ndarray, intercept: Any, alphas: np.ndarray) -> np.ndarray:
    """``neuroquery.ridge._gcv`` without its ``[n, n]`` hat matrix: the same ``[n_alphas, n]`` leave-one-out errors.

    The library forms ``H = U diag(t) Uᵀ`` for every alpha and multiplies it into every voxel (``n² V`` a
    alpha: most of a full-database NeuroQuery fit). The squared residual of sample ``i`` expands into terms
    computed once, ``Uᵀ Y``, ``Y (Uᵀ Y)ᵀ`` and ``(Uᵀ Y)(Uᵀ Y)ᵀ`` (``n k V``), after which each alpha costs ``n k²``.
    """
    del intercept  # the library's signature; unused there too
    intercept_dim = U.var(axis=0) < 1e-12
    uty = U.T @ Y
    cross = Y @ uty.T  # [n, k]: each sample's map against each singular direction's voxel pattern
    gram = uty @ uty.T
    sq = np.einsum("ij,ij->i", Y, Y)
    errors = np.zeros((len(alphas), Y.shape[0]), dtype=Y.dtype)
    for i, alpha in enumerate(alphas):
        t = s**2 / (s**2 + alpha)
        t[intercept_dim] = 1
        ut = U * t  # row i of H is ut[i] @ U.T
        scale = 1 - np.einsum("ij,ij->i", ut, U)  # 1 - diag(H)
        resid = sq - 2 * np.einsum("ij,ij->i", ut, cross) + np.einsum("ij,ij->i", ut @ gram, ut)
        errors[i] = np.maximum(resid, 0) / scale**2  # ||y_i - (H Y)_i||² / (1 - H_ii)²
    return errors


@contextlib.contextmanager
def fast_ridge_gcv() -> Iterator[None]:
    """Within the block, neuroquery's GCV ridges (``RidgeGCV``, ``AdaptiveRidge``, ``SmoothedRegression``) compute
    their leave-one-out errors with ``_gcv_without_hat``: the same errors, alpha and coefficients (6.8x sooner
    for 1,000 studies x 600 terms x 28,549 voxels on 2 cores beside a training; the SVDs of the tf-idf are
    untouched). Not for threads that fit NeuroQuery at the same time (it swaps a module global).
    """
    from neuroquery import ridge

    original = ridge._gcv
    ridge._gcv = _gcv_without_hat
    try:
        yield
    finally:
        ridge._gcv = original


def _linearised(
    predict: Callable[[np.ndarray], np.ndarray], n_terms: int, chunk: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """``(weights [n_terms, k], bias [k])`` of an affine ``predict``: its answers to no term and to each term alone.

    Raises:
        DataError: the prediction is not affine (a changed ``neuroquery`` release).
    """
    bias = predict(np.zeros((1, n_terms)))[0]
    starts = range(0, n_terms, chunk)
    weights = np.concatenate([predict(np.eye(min(chunk, n_terms - i), n_terms, k=i)) - bias for i in starts])
    probe = np.random.default_rng(0).random((4, n_terms)) * (np.random.default_rng(1).random((4, n_terms)) < 0.01)
    if not np.allclose(probe @ weights + bias, predict(probe), rtol=1e-4, atol=1e-6):
        raise DataError("neuroquery's SmoothedRegression.predict is not affine in this release; pin neuroquery")
    return weights, bias


def _candidates() -> list[Path]:
    repo = Path(__file__).resolve().parents[2]
    return [Path.cwd().parent / "shared/data/neuroquery", repo.parent / "shared/data/neuroquery"]


def _complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in NEUROQUERY_FILES.values())


def resolve_neuroquery_dir(explicit: str | Path | None = None, fetch: bool = True) -> Path:
    """Where the NeuroQuery files are: ``explicit``, else ``$CBVAE_NEUROQUERY_DIR``, else ``../shared/data/neuroquery``
    (from the working directory or the repository), else NiMARE's download (``fetch``).

    Raises:
        DataError: an explicit or environment folder lacks a file, or nothing is found and ``fetch`` is False.
    """
    for given, what in ((explicit, "--neuroquery-dir"), (os.environ.get(ENV_VAR) or None, ENV_VAR)):
        if given is not None:
            directory = Path(given)
            if not _complete(directory):
                missing = next(n for n in NEUROQUERY_FILES.values() if not (directory / n).is_file())
                raise DataError(f"{what} {directory} lacks {missing}; point it at the NeuroQuery files or drop it")
            return directory
    for directory in _candidates():
        if _complete(directory):
            return directory
    if not fetch:
        raise DataError("no NeuroQuery files found; pass --neuroquery-dir or set " + ENV_VAR)
    return fetch_neuroquery_dir()


def fetch_neuroquery_dir(data_dir: str | Path | None = None) -> Path:
    """NeuroQuery's count files through NiMARE's own fetcher (reuses an existing download, else downloads)."""
    from nimare.extract import fetch_neuroquery

    try:
        found = fetch_neuroquery(
            data_dir=data_dir, version="1", overwrite=False, return_type="files", vocab="neuroquery7547", type="count"
        )
    except OSError as err:
        raise DataError(
            f"cannot download NeuroQuery with nimare.extract.fetch_neuroquery ({err}); pass --neuroquery-dir"
        ) from err
    return Path(found[0]["metadata"]).parent


def neuroquery_checksums(directory: str | Path) -> dict[str, str]:
    """sha256 of every file read (for the build's cache key and manifest)."""
    from .sources import file_sha256

    return {name: file_sha256(Path(directory) / name) for name in NEUROQUERY_FILES.values()}


def read_neuroquery(directory: str | Path) -> NeuroQueryText:
    """Read NeuroQuery's metadata, vocabulary and the three count matrices, summed.

    Raises:
        DataError: a missing or unreadable file, or matrices that do not match the metadata and vocabulary.
    """
    directory = Path(directory)
    fix = "pass --neuroquery-dir pointing at an unmodified copy of NeuroQuery's data/ files"
    paths = {k: directory / v for k, v in NEUROQUERY_FILES.items()}
    try:
        with gzip.open(paths["metadata"], "rt") as f:
            meta = pd.read_csv(f, sep="\t", dtype={"id": str})
        vocabulary = paths["vocabulary"].read_text().splitlines()
        counts = [scipy.sparse.load_npz(paths[s]).tocsr() for s in _SOURCES]
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"cannot read NeuroQuery files in {directory} ({err}); {fix}") from err
    if "id" not in meta:
        raise DataError(f"{paths['metadata']} has no 'id' column; {fix}")
    for source, c in zip(_SOURCES, counts, strict=True):
        if c.shape != (len(meta), len(vocabulary)):
            raise DataError(
                f"{paths[source].name} is {c.shape[0]}x{c.shape[1]} but the metadata has {len(meta)} articles and the "
                f"vocabulary {len(vocabulary)} terms; {fix}"
            )
    total = (counts[0] + counts[1] + counts[2]).astype(np.float32).tocsr()
    return NeuroQueryText(meta["id"].astype(str).str.strip().to_numpy(), total, vocabulary)


def pmid_of(ids: Sequence[str]) -> np.ndarray:
    """PubMed id of each Neurosynth map id (``neurosynth:<pmid>`` or ``<pmid>-<n>``); None for other sources."""
    out = []
    for i in ids:
        s = str(i)
        if s.startswith("neurostore:"):
            out.append(None)
            continue
        s = s.removeprefix("neurosynth:").split("-", 1)[0]
        out.append(s if s.isdigit() else None)
    return np.array(out, dtype=object)


def join_text(text: NeuroQueryText, ids: Sequence[str]) -> tuple[scipy.sparse.csr_matrix, np.ndarray]:
    """Counts ``[len(ids), n_terms]`` of each map's study by PubMed id, and the observed flag (has a text row)."""
    row_of = pd.Series(np.arange(len(text.pmids)), index=text.pmids)
    row_of = row_of[~row_of.index.duplicated()]
    rows = row_of.reindex(pmid_of(ids)).to_numpy()
    found = np.flatnonzero(np.isfinite(rows))
    picked = text.counts[rows[found].astype(np.int64)]
    # an article whose three sources name no term carries no text either
    has_terms = np.asarray(picked.sum(axis=1)).ravel() > 0
    keep = found[has_terms]
    observed = np.zeros(len(rows), bool)
    observed[keep] = True
    place = scipy.sparse.csr_matrix((np.ones(len(keep)), (keep, np.arange(len(keep)))), shape=(len(rows), len(keep)))
    return (place @ picked[has_terms]).tocsr().astype(np.float32), observed


def tfidf(
    counts: scipy.sparse.spmatrix, observed: np.ndarray, train: np.ndarray, vocabulary: Sequence[str]
) -> tuple[scipy.sparse.csr_matrix, np.ndarray]:
    """NeuroQuery's tf-idf of joined counts, the idf from the training rows with text.

    Args:
        counts: ``[N, n_terms]`` term counts.
        observed: ``[N]`` bool, rows with text.
        train: ``[N]`` bool, the training split.
        vocabulary: the terms (for the phrase -> word operator).

    Returns:
        ``(tfidf [N, n_terms] CSR float32, idf [n_terms] float64)``.
    """
    counts = scipy.sparse.csr_matrix(counts) @ _unigram_operator(tuple(vocabulary))
    fit = np.asarray(observed, bool) & np.asarray(train, bool)
    if not fit.any():
        raise DataError("no training study has NeuroQuery text, so the term idf cannot be fitted; build without terms")
    df = np.asarray((counts[fit] > 0).sum(axis=0)).ravel() / fit.sum()
    # a term no training study uses gets the largest idf a single study would give, so a query can still use it
    idf = 1.0 - np.log(np.maximum(df, 1.0 / fit.sum()))
    return _weigh_expanded(counts, idf), idf


def texts_tfidf(texts: Sequence[str | None], vocabulary: Sequence[str], idf: np.ndarray) -> scipy.sparse.csr_matrix:
    """Texts (titles, a study's words) as NeuroQuery tf-idf rows on the dataset's scale: NeuroQuery's
    ``TextVectorizer`` (phrases of its vocabulary, NLTK stop words, each phrase also counted for its words),
    times the training idf, l2-normalised. A missing or unrecognised text is an empty row."""
    from neuroquery.tokenization import TextVectorizer

    vectorizer = TextVectorizer.from_vocabulary(list(vocabulary), use_idf=False, norm=None, add_unigrams=True)
    counts = vectorizer.transform([t if isinstance(t, str) else "" for t in texts])
    return _weigh_expanded(scipy.sparse.csr_matrix(counts, dtype=np.float64), np.asarray(idf, np.float64))


def weigh(counts: scipy.sparse.spmatrix, idf: np.ndarray, vocabulary: Sequence[str]) -> scipy.sparse.csr_matrix:
    """Term counts ``[n, n_terms]`` to NeuroQuery's tf-idf rows with a given idf (each phrase also counts its words)."""
    return _weigh_expanded(scipy.sparse.csr_matrix(counts) @ _unigram_operator(tuple(vocabulary)), idf)


def _weigh_expanded(counts: scipy.sparse.spmatrix, idf: np.ndarray) -> scipy.sparse.csr_matrix:
    from sklearn.preprocessing import normalize

    out = normalize(counts @ scipy.sparse.diags(idf), norm="l2", axis=1)
    return scipy.sparse.csr_matrix(out, dtype=np.float32)


@functools.lru_cache(maxsize=2)
def _unigram_operator(vocabulary: tuple[str, ...]) -> scipy.sparse.csr_matrix:
    from neuroquery.tokenization import unigram_operator

    return scipy.sparse.csr_matrix(unigram_operator(list(vocabulary)))


def build_terms(
    directory: str | Path,
    ids: Sequence[str],
    train: np.ndarray,
    dims: int = 0,
    seed: int = 0,
    kind: str = TERM_EMBEDDINGS[0],
    maps: Callable[[np.ndarray], np.ndarray] | None = None,
    groups: Sequence | None = None,
) -> tuple[Terms, dict[str, int]]:
    """Read, join and weight NeuroQuery's text for the maps ``ids`` and fit a ``dims``-entry embedding (0: none).

    Args:
        directory: NeuroQuery's files.
        ids: map ids (``pmid_of``).
        train: ``[N]`` bool, the training split.
        dims: embedding size; 0: the tf-idf only.
        seed: the embedding's seed.
        kind: one of ``TERM_EMBEDDINGS``.
        maps: the supervised kinds only: rows -> their ``[n, n_voxels]`` targets (``"neuroquery"``: the maps as
            the networks read them; ``"neuroquery-residual"``: their residual, ``builder.condition_residual``).
        groups: the supervised kinds only: ``[N]`` study group of each map (the cross-fit's folds).

    Returns:
        The terms and their counts for the manifest.

    Raises:
        DataError: an unknown ``kind``, or a supervised one without ``maps`` and ``groups``.
    """
    if kind not in TERM_EMBEDDINGS:
        raise DataError(f"--term-embedding {kind!r} is not known; use one of {', '.join(TERM_EMBEDDINGS)}")
    if dims and kind != "svd" and (maps is None or groups is None):
        raise DataError("the neuroquery text embedding needs the maps and their study groups")
    text = read_neuroquery(directory)
    counts, observed = join_text(text, ids)
    weights, idf = tfidf(counts, observed, train, text.vocabulary)
    fit = observed & np.asarray(train, bool)
    embedding, crossfit = None, None
    if dims and kind == "svd":
        embedding = fit_embedding(weights, fit, dims, seed)
    elif dims:
        rows = np.flatnonzero(fit)
        embedding, values = fit_supervised_embedding(
            weights, fit, maps(rows), np.asarray(groups)[rows], dims, seed=seed
        )  # fmt: skip
        crossfit = np.full((len(observed), embedding.dims), np.nan, np.float32)
        crossfit[rows] = values
    stats = {
        "articles_read": len(text.pmids),
        "maps_with_text": int(observed.sum()),
        "maps_without_text": int((~observed).sum()),
        "train_maps_with_text": int(fit.sum()),
    }
    logger.info("NeuroQuery: %d of %d maps have text (%d training)", stats["maps_with_text"], len(ids), int(fit.sum()))
    if embedding is not None:
        stats["embedding_dims"] = embedding.dims
    return Terms(weights, observed, idf, list(text.vocabulary), embedding, crossfit), stats


def save_terms(path: str | Path, terms: Terms) -> None:
    """Write ``terms.npz``: scipy's CSR arrays (``scipy.sparse.load_npz`` reads the tf-idf) plus the flag, idf, vocabulary."""
    m = terms.tfidf.tocsr()
    with open(path, "wb") as f:
        np.savez_compressed(
            f,
            format=np.array("csr"),
            shape=np.array(m.shape),
            data=m.data.astype(np.float32),
            indices=m.indices,
            indptr=m.indptr,
            observed=np.asarray(terms.observed, bool),
            idf=np.asarray(terms.idf, np.float64),
            vocabulary=np.array(terms.vocabulary, dtype=str),
            **(
                {"components": terms.embedding.components, "offset": terms.embedding.offset}
                if terms.embedding is not None
                else {}
            ),
            **({"crossfit": terms.crossfit} if terms.crossfit is not None else {}),
        )


def load_terms(dataset_dir: str | Path) -> Terms | None:
    """A dataset folder's ``terms.npz``; None when the folder was built without terms.

    Raises:
        DataError: the file is unreadable or does not match the folder's maps.
    """
    path = Path(dataset_dir) / TERMS_FILE
    if not path.is_file():
        return None
    try:
        tfidf_m = scipy.sparse.load_npz(path).tocsr()
        with np.load(path, allow_pickle=False) as z:
            observed, idf, vocabulary = z["observed"].astype(bool), z["idf"], [str(t) for t in z["vocabulary"]]
            embedding = TermEmbedding(z["components"], z["offset"]) if "components" in z else None
            crossfit = z["crossfit"] if "crossfit" in z else None
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{path} is unreadable ({err}); rebuild the dataset with --force") from err
    bad_embedding = embedding is not None and (
        embedding.components.shape[0] != len(idf)
        or embedding.offset.shape != (embedding.dims,)
        or (crossfit is not None and crossfit.shape != (len(observed), embedding.dims))
    )
    if tfidf_m.shape != (len(observed), len(idf)) or len(vocabulary) != len(idf) or bad_embedding:
        raise DataError(
            f"{path} is inconsistent (tf-idf {tfidf_m.shape}, {len(observed)} flags, {len(idf)} idf); rebuild with --force"
        )
    return Terms(tfidf_m, observed, idf, vocabulary, embedding, crossfit)
