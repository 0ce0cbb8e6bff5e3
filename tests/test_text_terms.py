"""NeuroQuery terms as a per-study condition: the join by PubMed id, NeuroQuery's tf-idf, the missing-text path,
the training split's text embedding (the ``terms`` condition) and the query path that reuses it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse
from sklearn.decomposition import PCA

from cbvae_ext.data import DataError, build_dataset
from cbvae_ext.data.builder import condition_features, condition_residual, term_columns
from cbvae_ext.data.categories import CATEGORIES
from cbvae_ext.data.dataset import load_dataset_info
from cbvae_ext.data.neuroquery import (
    ENV_VAR,
    NEUROQUERY_FILES,
    TextEmbedder,
    fit_supervised_embedding,
    join_text,
    load_terms,
    pmid_of,
    read_neuroquery,
    resolve_neuroquery_dir,
    tfidf,
)
from cbvae_ext.schema import CONTINUOUS_FIELDS

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


def test_the_terms_condition_is_the_training_embedding_and_a_query_takes_the_same_path(tmp_path):
    out = build_dataset(neurosynth_dir=NS, out=tmp_path / "ds", subset=60, neuroquery_dir=NQ, term_dims=8)
    info, terms = load_dataset_info(out), load_terms(out)
    g = info.schema.group("terms")
    assert info.schema.term_dims == terms.embedding.dims == g.size == 8
    meta, mask = info.encode(info.rows("all"))
    has_text = terms.observed
    np.testing.assert_array_equal(mask[:, g.mask_index], has_text)
    assert (meta[~has_text, g.meta_slice] == 0).all()  # no text: missing with mask 0, nothing invented
    # standardised on the training studies with text, and only on them
    fit = has_text & (info.metadata["split"] == "train").to_numpy()
    np.testing.assert_allclose(meta[fit, g.meta_slice].mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(meta[fit, g.meta_slice].std(axis=0), 1.0, rtol=1e-4)
    assert not np.allclose(meta[has_text & ~fit, g.meta_slice].std(axis=0), 1.0, rtol=1e-3)
    # a study's text as a query (its term counts) lands exactly on its stored embedding
    text = read_neuroquery(NQ)
    counts, _ = join_text(text, info.metadata["id"])
    row = int(np.flatnonzero(has_text)[0])
    embedder = terms.embedder()
    query = embedder.embed_counts(counts[row].toarray()[0])
    np.testing.assert_allclose(query, info.metadata.loc[row, term_columns(8)].to_numpy(float), rtol=1e-4, atol=1e-5)
    # recognised terms: repeats count, terms outside the vocabulary do not, nothing recognised is None
    assert embedder.embed_terms(["no such term"]) is None
    once, twice = embedder.embed_terms(["pain"]), embedder.embed_terms(["pain", "pain", "no such term"])
    np.testing.assert_allclose(once, twice, rtol=1e-5)  # l2-normalised tf-idf: a repeated term alone is the same
    assert not np.allclose(embedder.embed_terms(["pain", "memory"]), once)
    # the file the run folder carries round-trips
    embedder.save(tmp_path / "e.npz")
    back = TextEmbedder.load(tmp_path / "e.npz")
    np.testing.assert_array_equal(back.embedding.components, embedder.embedding.components)
    assert back.vocabulary == embedder.vocabulary
    # --term-dims 0: the tf-idf only, no terms condition
    plain = build_dataset(neurosynth_dir=NS, out=out, subset=60, neuroquery_dir=NQ, term_dims=0, force=True)
    assert load_terms(plain).embedding is None and load_dataset_info(plain).schema.term_dims == 0
    with pytest.raises(DataError, match="--term-dims"):
        build_dataset(neurosynth_dir=NS, out=tmp_path / "x", subset=60, neuroquery_dir=NQ, term_dims=-1)


def _synthetic_text(n: int, n_terms: int, seed: int) -> scipy.sparse.csr_matrix:
    from sklearn.preprocessing import normalize

    rng = np.random.default_rng(seed)
    x = rng.random((n, n_terms)) * (rng.random((n, n_terms)) < 0.2)
    x[np.arange(n), rng.integers(0, n_terms, n)] += 1.0  # every text has a term
    return scipy.sparse.csr_matrix(normalize(x))


def test_the_neuroquery_embedding_is_cross_fitted_and_linear():
    from neuroquery.smoothed_regression import SmoothedRegression
    from sklearn.model_selection import GroupKFold

    n, n_terms, n_voxels = 240, 40, 30
    x = _synthetic_text(n, n_terms, 0)
    rng = np.random.default_rng(1)
    # four of the terms each raise their own voxel (NeuroQuery's model of text and maps)
    coef = np.zeros((n_terms, n_voxels))
    coef[np.arange(4), rng.choice(n_voxels, 4, replace=False)] = 1.0
    maps = x @ coef + 0.05 * rng.random((n, n_voxels))
    fit, groups = np.arange(n) < 200, np.arange(200) // 2
    embedding, crossfit = fit_supervised_embedding(x, fit, maps[fit], groups, dims=2)
    np.testing.assert_allclose(crossfit.mean(axis=0), 0.0, atol=1e-8)  # standardised on what training stores
    np.testing.assert_allclose(crossfit.std(axis=0), 1.0, rtol=1e-6)
    # what the text says about the map reaches new studies through the one exported linear map
    pca = PCA(2, svd_solver="randomized", random_state=0).fit(maps[fit])
    for k in range(2):
        assert abs(np.corrcoef(embedding.embed(x[~fit])[:, k], pca.transform(maps[~fit])[:, k])[0, 1]) > 0.9
    # a training study's stored value is the prediction of NeuroQuery's regression fitted without its fold
    kept, out = next(GroupKFold(5).split(crossfit, groups=groups))
    other = SmoothedRegression(n_components=min(300, len(kept) - 1)).fit(x[kept], maps[kept])
    expect = pca.transform(other.predict(x[out].toarray()))
    full = pca.transform(SmoothedRegression(n_components=199).fit(x[fit], maps[fit]).predict(x[out].toarray()))
    for k in range(2):  # the stored values are those predictions, rescaled per dimension
        slope, intercept = np.polyfit(expect[:, k], crossfit[out, k], 1)
        np.testing.assert_allclose(slope * expect[:, k] + intercept, crossfit[out, k], atol=1e-6)
        assert not np.allclose(full[:, k], expect[:, k], atol=1e-3)  # and not the full fit's, which saw them
    with pytest.raises(DataError, match="too few"):
        fit_supervised_embedding(x, np.arange(n) < 2, maps[:2], np.arange(2), dims=2)


def test_the_residual_target_is_what_the_conditions_leave():
    rng = np.random.default_rng(0)
    n, tcols = 300, ["topic_0", "topic_1", "topic_2"]
    rows = pd.DataFrame(rng.dirichlet(np.ones(3), n), columns=tcols)
    rows["topics_observed"] = True
    rows["category"] = rng.choice([*CATEGORIES[:3], None], n)
    for name in CONTINUOUS_FIELDS:
        rows[name] = np.where(rng.random(n) < 0.3, np.nan, rng.normal(2000.0, 5.0, n))
    rows["split"] = np.array(["train", "train", "train", "val", "test"])[np.arange(n) % 5]
    x = condition_features(rows, tcols)
    assert x.shape == (n, 3 + 1 + len(CATEGORIES) + 2 * len(CONTINUOUS_FIELDS))
    assert np.isfinite(x).all() and np.allclose(x[:, 4 : 4 + len(CATEGORIES)].sum(1), rows["category"].notna())
    maps = x @ rng.normal(size=(x.shape[1], 50)) + 0.1 * (noise := rng.normal(size=(n, 50)))
    residual = condition_residual(lambda r: maps[r], rows, tcols)(np.arange(n))
    # what the conditions explain is gone, what they do not (the noise) is left
    assert residual.var() < 0.05 * maps.var()
    assert np.corrcoef(residual.ravel(), noise.ravel())[0, 1] > 0.9


@pytest.mark.parametrize("kind", ["neuroquery", "neuroquery-residual"])
def test_a_neuroquery_build_stores_cross_fitted_training_rows(tmp_path, kind):
    out = build_dataset(
        neurosynth_dir=NS, out=tmp_path / "ds", subset=60, neuroquery_dir=NQ, term_dims=4, term_embedding=kind
    )
    info, terms = load_dataset_info(out), load_terms(out)
    assert info.manifest["options"]["terms"]["embedding"] == kind
    g = info.schema.group("terms")
    meta, _ = info.encode(info.rows("all"))
    fit = terms.observed & (info.metadata["split"] == "train").to_numpy()
    new = terms.observed & ~fit
    stored = meta[:, g.meta_slice]
    np.testing.assert_allclose(stored[fit].mean(axis=0), 0.0, atol=1e-5)
    # validation / test rows take the exported linear map, as a query does; training rows do not
    np.testing.assert_allclose(stored[new], terms.embedding.embed(terms.tfidf[new]), rtol=1e-4, atol=1e-5)
    assert not np.allclose(stored[fit], terms.embedding.embed(terms.tfidf[fit]), atol=1e-2)
    assert np.isnan(terms.crossfit[~fit]).all() and np.isfinite(terms.crossfit[fit]).all()
    with pytest.raises(DataError, match="--term-embedding 'pca'"):
        build_dataset(neurosynth_dir=NS, out=tmp_path / "x", subset=60, neuroquery_dir=NQ, term_embedding="pca")


def test_a_damaged_embedding_file_is_one_line(tmp_path):
    (tmp_path / "e.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="e.npz is unreadable"):
        TextEmbedder.load(tmp_path / "e.npz")


def test_resolve_names_a_folder_that_lacks_a_file(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(DataError, match=NEUROQUERY_FILES["metadata"]):
        resolve_neuroquery_dir(tmp_path, fetch=False)
    monkeypatch.setenv(ENV_VAR, str(NQ))
    assert resolve_neuroquery_dir(None, fetch=False) == NQ
