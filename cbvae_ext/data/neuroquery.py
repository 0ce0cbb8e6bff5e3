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

The condition the network sees is a low-dimensional **embedding** of that tf-idf (``TermEmbedding``): a
truncated SVD fitted on the training studies with text, each dimension standardised on them. It is
linear, so a typed query (``TextEmbedder.embed_counts``) goes through exactly the map a study's text did,
and ``terms.npz`` carries it (``components``, ``offset``) for the app and the export.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse

from .errors import DataError

__all__ = [
    "ENV_VAR",
    "NEUROQUERY_FILES",
    "TERMS_FILE",
    "NeuroQueryText",
    "TermEmbedding",
    "Terms",
    "TextEmbedder",
    "build_terms",
    "fit_embedding",
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
    """

    tfidf: scipy.sparse.csr_matrix
    observed: np.ndarray
    idf: np.ndarray
    vocabulary: list[str]
    embedding: TermEmbedding | None = None

    def embedder(self) -> TextEmbedder:
        """What a query needs to be embedded like a study's text (no per-study rows)."""
        return TextEmbedder(self._embedding(), np.asarray(self.idf, np.float64), list(self.vocabulary))

    def embedded(self) -> np.ndarray:
        """``[N, dims]`` embedding of every map's text, NaN rows where the study has none (missing, not zero)."""
        out = self._embedding().embed(self.tfidf)
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
    e = np.asarray(x @ svd.components_.T, dtype=np.float64)
    scale = e.std(axis=0)
    scale[scale <= 0] = 1.0
    components = (svd.components_.T / scale).astype(np.float32)
    return TermEmbedding(components, (e.mean(axis=0) / scale).astype(np.float32))


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
    directory: str | Path, ids: Sequence[str], train: np.ndarray, dims: int = 0, seed: int = 0
) -> tuple[Terms, dict[str, int]]:
    """Read, join and weight NeuroQuery's text for the maps ``ids`` and fit a ``dims``-entry embedding (0: none).

    Returns:
        The terms and their counts for the manifest.
    """
    text = read_neuroquery(directory)
    counts, observed = join_text(text, ids)
    weights, idf = tfidf(counts, observed, train, text.vocabulary)
    embedding = fit_embedding(weights, observed & np.asarray(train, bool), dims, seed) if dims else None
    stats = {
        "articles_read": len(text.pmids),
        "maps_with_text": int(observed.sum()),
        "maps_without_text": int((~observed).sum()),
        "train_maps_with_text": int((observed & np.asarray(train, bool)).sum()),
    }
    logger.info(
        "NeuroQuery: %d of %d maps have text (%d training)",
        stats["maps_with_text"],
        len(ids),
        stats["train_maps_with_text"],
    )
    if embedding is not None:
        stats["embedding_dims"] = embedding.dims
    return Terms(weights, observed, idf, list(text.vocabulary), embedding), stats


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
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{path} is unreadable ({err}); rebuild the dataset with --force") from err
    bad_embedding = embedding is not None and (
        embedding.components.shape[0] != len(idf) or embedding.offset.shape != (embedding.dims,)
    )
    if tfidf_m.shape != (len(observed), len(idf)) or len(vocabulary) != len(idf) or bad_embedding:
        raise DataError(
            f"{path} is inconsistent (tf-idf {tfidf_m.shape}, {len(observed)} flags, {len(idf)} idf); rebuild with --force"
        )
    return Terms(tfidf_m, observed, idf, vocabulary, embedding)
