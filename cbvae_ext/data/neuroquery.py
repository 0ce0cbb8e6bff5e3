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
"""

from __future__ import annotations

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
    "Terms",
    "build_terms",
    "fetch_neuroquery_dir",
    "join_text",
    "load_terms",
    "neuroquery_checksums",
    "pmid_of",
    "read_neuroquery",
    "resolve_neuroquery_dir",
    "save_terms",
    "tfidf",
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
    """

    tfidf: scipy.sparse.csr_matrix
    observed: np.ndarray
    idf: np.ndarray
    vocabulary: list[str]


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
    from neuroquery.tokenization import unigram_operator
    from sklearn.preprocessing import normalize

    counts = scipy.sparse.csr_matrix(counts) @ unigram_operator(list(vocabulary))
    fit = np.asarray(observed, bool) & np.asarray(train, bool)
    if not fit.any():
        raise DataError("no training study has NeuroQuery text, so the term idf cannot be fitted; build without terms")
    df = np.asarray((counts[fit] > 0).sum(axis=0)).ravel() / fit.sum()
    # a term no training study uses gets the largest idf a single study would give, so a query can still use it
    idf = 1.0 - np.log(np.maximum(df, 1.0 / fit.sum()))
    out = normalize(counts @ scipy.sparse.diags(idf), norm="l2", axis=1)
    return scipy.sparse.csr_matrix(out, dtype=np.float32), idf


def build_terms(directory: str | Path, ids: Sequence[str], train: np.ndarray) -> tuple[Terms, dict[str, int]]:
    """Read, join and weight NeuroQuery's text for the maps ``ids``; returns the terms and counts for the manifest."""
    text = read_neuroquery(directory)
    counts, observed = join_text(text, ids)
    weights, idf = tfidf(counts, observed, train, text.vocabulary)
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
    return Terms(weights, observed, idf, list(text.vocabulary)), stats


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
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{path} is unreadable ({err}); rebuild the dataset with --force") from err
    if tfidf_m.shape != (len(observed), len(idf)) or len(vocabulary) != len(idf):
        raise DataError(
            f"{path} is inconsistent (tf-idf {tfidf_m.shape}, {len(observed)} flags, {len(idf)} idf); rebuild with --force"
        )
    return Terms(tfidf_m, observed, idf, vocabulary)
