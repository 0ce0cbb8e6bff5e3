"""NeuroQuery terms as a per-study condition: the join by PubMed id, NeuroQuery's tf-idf, the missing-text path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse

from cbvae_ext.data import DataError, build_dataset
from cbvae_ext.data.neuroquery import (
    ENV_VAR,
    NEUROQUERY_FILES,
    join_text,
    load_terms,
    pmid_of,
    read_neuroquery,
    resolve_neuroquery_dir,
    tfidf,
)

FIXTURES = Path(__file__).parent / "data"
NQ = FIXTURES / "neuroquery"
NS = FIXTURES / "neurosynth"


def test_pmid_of_accepts_our_ids_and_nimare_ids():
    got = pmid_of(["neurosynth:9065511", "9065511-1", "neurostore:abc", "neurosynth:x12"])
    assert got.tolist() == ["9065511", "9065511", None, None]


def test_join_matches_the_source_rows_and_flags_missing_text():
    text = read_neuroquery(NQ)
    assert text.counts.shape == (len(text.pmids), 7547)
    ids = [f"neurosynth:{text.pmids[3]}", "neurosynth:1", f"{text.pmids[0]}-2", "neurostore:a"]
    counts, observed = join_text(text, ids)
    assert observed.tolist() == [True, False, True, False]
    np.testing.assert_array_equal(counts[0].toarray(), text.counts[3].toarray())
    np.testing.assert_array_equal(counts[2].toarray(), text.counts[0].toarray())
    assert counts[1].nnz == 0 and counts[3].nnz == 0  # missing stays empty, never invented


def test_tfidf_is_neuroquerys_with_idf_from_train_only():
    voc = ["memory", "working memory", "pain"]
    counts = scipy.sparse.csr_matrix(np.array([[0, 1, 0], [1, 0, 1], [0, 0, 2], [0, 0, 0]], dtype=np.float32))
    observed = np.array([True, True, True, False])
    train = np.array([True, True, False, True])
    weights, idf = tfidf(counts, observed, train, voc)
    # phrases also count their words (NeuroQuery's add_unigrams): row 0 has memory 1, working memory 1
    # df on the 2 training rows with text: memory 2/2, working memory 1/2, pain 1/2; row 2 (val) does not count
    np.testing.assert_allclose(idf, [1.0, 1 + np.log(2), 1 + np.log(2)])
    row0 = np.array([1.0, 1 + np.log(2), 0.0])
    np.testing.assert_allclose(weights[0].toarray()[0], row0 / np.linalg.norm(row0), rtol=1e-6)
    np.testing.assert_allclose(weights[2].toarray()[0], [0, 0, 1], rtol=1e-6)
    assert weights[3].nnz == 0


def test_build_writes_terms_for_the_studies_with_text(tmp_path):
    out = build_dataset(neurosynth_dir=NS, out=tmp_path / "ds", subset=60, neuroquery_dir=NQ)
    terms = load_terms(out)
    meta = pd.read_parquet(out / "metadata.parquet")
    text = read_neuroquery(NQ)
    expect = meta["id"].str.removeprefix("neurosynth:").isin(set(text.pmids)).to_numpy()
    assert terms.tfidf.shape == (len(meta), 7547)
    assert 0 < terms.observed.sum() < len(meta)
    np.testing.assert_array_equal(terms.observed, expect)
    norms = np.sqrt(np.asarray(terms.tfidf.multiply(terms.tfidf).sum(axis=1)).ravel())
    np.testing.assert_allclose(norms[terms.observed], 1.0, rtol=1e-5)
    assert (norms[~terms.observed] == 0).all()
    # the idf comes from the training rows: refitting on them gives the stored one
    train = (meta["split"] == "train").to_numpy()
    counts, observed = join_text(text, meta["id"])
    _, idf = tfidf(counts, observed, train, text.vocabulary)
    np.testing.assert_allclose(terms.idf, idf)
    # a build without terms has no terms.npz, and rebuilding over a folder with one is allowed
    plain = build_dataset(neurosynth_dir=NS, out=out, subset=60, force=True)
    assert load_terms(plain) is None


def test_resolve_names_a_folder_that_lacks_a_file(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(DataError, match=NEUROQUERY_FILES["metadata"]):
        resolve_neuroquery_dir(tmp_path, fetch=False)
    monkeypatch.setenv(ENV_VAR, str(NQ))
    assert resolve_neuroquery_dir(None, fetch=False) == NQ
