"""The NeuroStore studyset shipped with NiMARE builds, alone and combined with Neurosynth."""

from __future__ import annotations

from pathlib import Path

import nimare
import numpy as np
import pandas as pd
import pytest

from cbvae_ext.data import build_dataset, load_dataset_info, make_dataset

STUDYSET = Path(nimare.__file__).parent / "resources" / "nback_vs_flanker_studyset_2026-07"


@pytest.fixture(scope="module")
def neurostore_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ns") / "nback_flanker"
    return build_dataset(neurosynth=False, neurostore_dirs=[STUDYSET], out=out)


def test_studyset_rows_sample_sizes_and_categories(neurostore_only: Path) -> None:
    info = load_dataset_info(neurostore_only)
    meta, c = info.metadata, info.manifest["counts"]["neurostore:nback_vs_flanker_studyset_2026-07"]
    assert c["studies_read"] == 906 and c["peaks_read"] == 9492
    assert len(meta) == c["n_maps"] == 906 - c["studies_without_peaks"]
    assert meta["id"].str.startswith("neurostore:").all() and meta["id"].is_unique
    # participant counts: 898 analyses report one; one of them lists only a non-scanned group -> missing
    ann = pd.read_parquet(
        STUDYSET / "annotations.parquet",
        columns=["id", "comparison_task"]
        + [
            "ParticipantDemographicsExtractor.groups[0].count",
            "ParticipantDemographicsExtractor.groups[0].imaging_sample",
        ],
    ).set_index("id")
    ann = ann.reindex(meta["id"].str.removeprefix("neurostore:"))
    reported = ann["ParticipantDemographicsExtractor.groups[0].count"].notna().to_numpy()
    assert 898 - c["studies_without_peaks"] <= reported.sum() <= 898
    assert meta["sample_size_observed"].sum() == reported.sum() - 1
    assert (meta["sample_size"].dropna() >= 4).all()
    # task names -> category agrees with the task each analysis was selected for
    expected = ann["comparison_task"].map({"n-back": "working memory", "flanker": "cognitive control"})
    assert (meta["category"].to_numpy() == expected.to_numpy()).all()
    # no year in this release: missing, not invented
    assert meta["year"].isna().all() and (meta["year_bin"] == -1).all() and info.schema.n_year_bins == 0
    assert info.schema.field("sample_size").observed
    # analyses of one study stay in one split
    assert meta.groupby("study_id")["split"].nunique().max() == 1
    item = make_dataset(neurostore_only, "test")[0]
    assert item["meta_mask"].tolist() == [
        0,
        float(meta.set_index("id").loc[item["id"], "sample_size_observed"]),
        0,
        0,
        1,
    ]


def test_combines_with_neurosynth(neurosynth_dir: Path, neurostore_only: Path, tmp_path: Path) -> None:
    out = build_dataset(neurosynth_dir=neurosynth_dir, neurostore_dirs=[STUDYSET], out=tmp_path / "both", subset=60)
    info = load_dataset_info(out)
    alone = load_dataset_info(neurostore_only)
    sources = info.metadata["source"].value_counts().to_dict()
    assert sources == {"neurostore:nback_vs_flanker_studyset_2026-07": len(alone.metadata), "neurosynth": 60}
    assert len(info.maps) == len(info.metadata) == 60 + len(alone.metadata)
    # the same analysis gives the same map whichever sources it is built with
    rows = np.flatnonzero(info.metadata["source"].str.startswith("neurostore").to_numpy())
    assert (info.metadata["id"].to_numpy()[rows] == alone.metadata["id"].to_numpy()).all()
    assert np.array_equal(np.asarray(info.maps[rows[:50]]), np.asarray(alone.maps[:50]))
    assert info.schema.field("year").observed and info.schema.n_year_bins == 10
    assert info.metadata.loc[rows, "year_bin"].eq(-1).all()
    # topics: observed (a mixture) for Neurosynth rows, missing (zeros, mask 0) for NeuroStore rows
    topics = info.schema.group("topics")
    meta, mask = info.encode(np.arange(len(info.metadata)))
    ns = np.setdiff1d(np.arange(len(info.metadata)), rows)
    assert (mask[rows, topics.mask_index] == 0).all() and (meta[rows, topics.meta_slice] == 0).all()
    assert (mask[ns, topics.mask_index] == 1).all()
    np.testing.assert_allclose(meta[ns, topics.meta_slice].sum(axis=1), 1.0, atol=1e-4)
    # a NeuroStore-only build has no topic vocabulary, so no topics group
    assert alone.schema.n_topics == 0 and [g.name for g in alone.schema.groups][-1] == "task"
