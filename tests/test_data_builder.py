"""Dataset builder and loader on real Neurosynth v7 subsets (4 mm)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_TERM_DIMS

from cbvae_ext.data import (
    CATEGORIES,
    DataError,
    build_dataset,
    load_dataset_info,
    load_split_tensors,
    make_dataset,
)
from cbvae_ext.data.grid import make_grid
from cbvae_ext.data.sources import NEUROSYNTH_FILES, read_neurosynth
from cbvae_ext.schema import MetadataSchema

COLUMNS = [
    "id", "study_id", "source", "title", "year", "year_observed", "sample_size", "sample_size_observed",
    "field_strength", "field_strength_observed", "fwhm", "fwhm_observed",
    *[f"topic_{i:02d}" for i in range(50)], "topics_observed", "category", "category_observed",
    "space", "n_peaks", "year_bin", "split_group", "split",
]  # fmt: skip


def test_layout_and_metadata(tiny_dataset: Path) -> None:
    info = load_dataset_info(tiny_dataset)
    meta, maps = info.metadata, info.maps
    # the tiny dataset has NeuroQuery's text and a terms condition: its embedding follows the topics
    dims = info.schema.term_dims
    assert dims == TINY_TERM_DIMS
    at = COLUMNS.index("category")
    assert list(meta.columns) == [
        *COLUMNS[:at],
        *[f"term_{i:02d}" for i in range(dims)],
        "terms_observed",
        *COLUMNS[at:],
    ]
    assert maps.shape == (120, 48, 56, 48) and maps.dtype == np.float16
    assert isinstance(maps, np.memmap)
    assert meta["id"].is_unique and meta["id"].str.startswith("neurosynth:").all()
    # never invented: Neurosynth has no sample size, nobody has field strength or FWHM
    for field in ("sample_size", "field_strength", "fwhm"):
        assert meta[field].isna().all() and not meta[f"{field}_observed"].any()
    assert meta["year_observed"].all() and meta["year"].between(1997, 2018).all()
    assert set(meta["category"]) <= set(CATEGORIES) and meta["category"].nunique() >= 12
    assert set(meta["space"]) <= {"MNI", "TAL", "UNKNOWN"}
    # maps: positive peak, zero outside the mask, NIfTI mask on the manifest grid
    peaks = maps.reshape(len(maps), -1).max(axis=1).astype(np.float32)
    assert (peaks > 0).all()
    assert float(np.abs(maps[:, ~info.mask]).max()) == 0.0
    img = nib.load(tiny_dataset / "mask.nii.gz")
    assert img.shape == (48, 56, 48) and np.allclose(img.affine, info.manifest["grid"]["affine"])
    assert int(info.mask.sum()) == info.manifest["grid"]["n_mask_voxels"]


def test_map_row_matches_its_peaks(tiny_dataset: Path, neurosynth_dir: Path) -> None:
    """Row i of the table is map i: the map's maximum sits on one of that study's in-mask peaks."""
    info = load_dataset_info(tiny_dataset)
    source = read_neurosynth(neurosynth_dir)
    grid = make_grid(4)
    row_of = {i: n for n, i in enumerate(source.rows["id"])}
    for i in (0, 57, 119):
        study = source.peaks[source.peaks["row"] == row_of[info.metadata["id"].iloc[i]]]
        ijk = grid.voxels(study[["x", "y", "z"]].to_numpy())
        ijk = ijk[grid.in_mask(ijk)]
        assert len(ijk) == info.metadata["n_peaks"].iloc[i]
        values = info.maps[i][tuple(ijk.T)].astype(np.float32)
        assert np.isclose(values.max(), info.maps[i].max(), rtol=1e-3)


@pytest.mark.full_data
def test_full_database_is_read_whole(neurosynth_dir: Path) -> None:
    source = read_neurosynth(neurosynth_dir)
    assert (len(source.rows), len(source.peaks)) == (14371, 507891) and source.topics.shape == (14371, 50)
    assert source.counts["studies_tal"] == 2335 and source.counts["studies_unknown_space"] == 1832


def test_counts_splits_and_year_bins(tiny_dataset: Path, neurosynth_dir: Path) -> None:
    info = load_dataset_info(tiny_dataset)
    m, meta = info.manifest, info.metadata
    c = m["counts"]["neurosynth"]
    source = read_neurosynth(neurosynth_dir)
    assert (c["studies_read"], c["peaks_read"]) == (len(source.rows), len(source.peaks))
    assert c["studies_read"] - c["studies_without_peaks"] - c["studies_not_in_subset"] == c["n_maps"] == 120
    assert c["peaks_outside_mask"] > 0 and c["studies_without_peaks"] > 0
    assert m["split_counts"] == {"train": 96, "val": 12, "test": 12}
    assert meta.groupby("study_id")["split"].nunique().max() == 1
    assert meta.groupby("split_group")["split"].nunique().max() == 1
    dup = m["duplicate_maps"]
    assert dup["n_groups"] == len(dup["groups"]) and dup["n_maps"] == sum(len(g) for g in dup["groups"])
    for group in dup["groups"]:  # identical maps, one split
        rows = meta.index[meta["id"].isin(group)].to_numpy()
        assert len(set(meta["split"].iloc[rows])) == 1
        assert all(np.array_equal(info.maps[rows[0]], info.maps[r]) for r in rows[1:])
    # year bins: 10 equal-frequency bins whose edges come from the training split only
    schema = MetadataSchema.from_dict(m["schema"])
    train_years = meta.loc[meta["split"] == "train", "year"].to_numpy()
    assert np.allclose(schema.year_bin_edges, np.quantile(train_years, np.linspace(0, 1, 11)))
    assert m["year_bin_edges"] == schema.year_bin_edges
    assert (meta["year_bin"].to_numpy() == schema.year_bin(meta["year"].to_numpy())).all()
    assert schema.categories == CATEGORIES and m["kernel"]["name"] == "ale" and m["kernel"]["kernel_fwhm_mm"] == 10.0
    assert len(m["sources"][0]["files"]) == 5 and "package_version" in m and m["cache_key"]
    assert m["format"] == "cbvae-dataset" and m["format_version"] == 3


def test_topics_are_the_studies_lda50_weights(tiny_dataset: Path, neurosynth_dir: Path) -> None:
    """Each row carries its own study's 50 LDA weights (rows of the npz follow the metadata file order)."""
    import scipy.sparse

    info = load_dataset_info(tiny_dataset)
    schema = info.schema
    vocab = (neurosynth_dir / NEUROSYNTH_FILES["vocabulary"]).read_text().split()
    assert schema.topic_names == vocab and len(schema.topic_keys) == 50
    assert schema.topic_keys[9].startswith("memory working wm")
    assert schema.meta_dim == 4 + 50 + schema.term_dims + 15 and schema.mask_dim == 7
    ns_ids = pd.read_csv(neurosynth_dir / NEUROSYNTH_FILES["metadata"], sep="\t", dtype={"id": str})["id"]
    weights = scipy.sparse.load_npz(neurosynth_dir / NEUROSYNTH_FILES["features"]).toarray()
    source_row = pd.Series(np.arange(len(ns_ids)), index="neurosynth:" + ns_ids)
    rows = np.arange(len(info.metadata))
    expected = weights[source_row[info.metadata["id"]].to_numpy()]
    meta, mask = info.encode(rows)
    topics = schema.group("topics")
    assert topics.kind == "vector" and topics.mask_index == 4
    np.testing.assert_allclose(meta[:, topics.meta_slice], expected, rtol=1e-6, atol=1e-7)
    assert (mask[:, topics.mask_index] == 1).all() and info.metadata["topics_observed"].all()
    # the derived task category is the same as before the topics were stored
    from cbvae_ext.data.categories import topic_categories

    assert list(info.metadata["category"]) == list(topic_categories(expected))


def test_manifest_checksums_match_inputs(tiny_dataset: Path, neurosynth_dir: Path) -> None:
    files = load_dataset_info(tiny_dataset).manifest["sources"][0]["files"]
    sums = dict(line.split()[::-1] for line in (neurosynth_dir / "SHA256SUMS").read_text().splitlines() if line)
    for name, digest in files.items():
        assert sums[name.lstrip("*")] == digest


def test_subset_is_stratified_and_deterministic(tiny_dataset: Path, neurosynth_dir: Path, tmp_path: Path) -> None:
    again = build_dataset(neurosynth_dir=neurosynth_dir, out=tmp_path / "again", subset=120, resolution=4)
    a, b = load_dataset_info(tiny_dataset), load_dataset_info(again)
    pd.testing.assert_frame_equal(a.metadata[b.metadata.columns], b.metadata)  # the same rows, without terms
    assert np.array_equal(np.asarray(a.maps), np.asarray(b.maps))
    # stratified: every category with >= 2% of the full database appears in a 120-study subset
    full = read_neurosynth(neurosynth_dir).rows["category"].value_counts(normalize=True)
    assert set(full[full >= 0.02].index) <= set(a.metadata["category"])


def test_cache_reused_unless_forced(neurosynth_dir: Path, tmp_path: Path) -> None:
    out = build_dataset(neurosynth_dir=neurosynth_dir, out=tmp_path / "ds", subset=30)
    stamp = (out / "maps.npy").stat().st_mtime_ns
    created = json.loads((out / "manifest.json").read_text())["created"]
    assert build_dataset(neurosynth_dir=neurosynth_dir, out=out, subset=30) == out
    assert (out / "maps.npy").stat().st_mtime_ns == stamp
    build_dataset(neurosynth_dir=neurosynth_dir, out=out, subset=30, force=True)
    assert (out / "maps.npy").stat().st_mtime_ns != stamp or json.loads((out / "manifest.json").read_text())[
        "created"
    ] != created
    # other options -> other key -> rebuilt with the new kernel
    build_dataset(neurosynth_dir=neurosynth_dir, out=out, subset=30, kernel="mkda")
    info = load_dataset_info(out)
    assert info.manifest["kernel"]["name"] == "mkda"
    assert set(np.unique(np.asarray(info.maps, dtype=np.float32))) == {0.0, 1.0}
    assert not list(tmp_path.glob(".ds.*"))  # no temporary or old folders left behind


def test_monai_dataset_items(tiny_dataset: Path) -> None:
    info = load_dataset_info(tiny_dataset)
    ds = make_dataset(tiny_dataset, "val")
    assert len(ds) == 12
    item = ds[3]
    row = int(info.rows("val")[3])
    assert item["id"] == info.metadata["id"].iloc[row]
    assert item["image"].shape == (1, 48, 56, 48) and item["image"].dtype == torch.float32
    expected = np.asarray(info.maps[row], dtype=np.float32)
    assert torch.allclose(item["image"][0], torch.from_numpy(expected / expected.max()), atol=1e-6)
    meta, meta_mask = info.encode(np.array([row]))
    assert torch.equal(item["meta"], torch.from_numpy(meta[0])) and torch.equal(
        item["meta_mask"], torch.from_numpy(meta_mask[0])
    )
    has_text = float(info.metadata["terms_observed"].iloc[row])
    assert item["meta"].shape == (info.schema.meta_dim,) and item["meta_mask"].tolist() == [1, 0, 0, 0, 1, has_text, 1]
    assert item["category"] == CATEGORIES.index(info.metadata["category"].iloc[row])
    assert item["year_bin"] == info.metadata["year_bin"].iloc[row]
    cached = make_dataset(tiny_dataset, "val", cache=True)
    assert torch.equal(cached[3]["image"], item["image"])
    with pytest.raises(DataError, match="unknown split"):
        make_dataset(tiny_dataset, "validation")


def test_resident_split_matches_dataset(tiny_dataset: Path) -> None:
    tensors = load_split_tensors(tiny_dataset, "test", device="cpu", dtype=torch.float32)
    ds = make_dataset(tiny_dataset, "test")
    assert tensors["image"].shape == (12, 1, 48, 56, 48) and tensors["id"] == [ds[i]["id"] for i in range(12)]
    for i in (0, 11):
        assert torch.allclose(tensors["image"][i], ds[i]["image"], atol=1e-6)
        assert torch.equal(tensors["meta"][i], ds[i]["meta"]) and tensors["category"][i] == ds[i]["category"]
    half = load_split_tensors(tiny_dataset, "test", device="cpu", dtype=torch.float16)
    assert half["image"].dtype == torch.float16 and torch.allclose(half["image"].float(), tensors["image"], atol=1e-3)


def test_incomplete_folder_does_not_load(tiny_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset_info(tmp_path / "nothing")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("maps.npy", "metadata.parquet", "mask.nii.gz"):
        (broken / name).write_bytes((tiny_dataset / name).read_bytes())
    with pytest.raises(DataError, match=r"incomplete \(missing manifest.json\)"):
        load_dataset_info(broken)


@pytest.mark.full_data
def test_interrupted_build_leaves_nothing_that_loads(neurosynth_dir: Path, tmp_path: Path, repo_root: Path) -> None:
    """SIGKILL mid-write: OUT never appears; the next build cleans the partial folder and succeeds."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "cbvae_ext.data", "build", "--neurosynth-dir", str(neurosynth_dir), "--out", str(out),
           "--subset", "3000", "--dtype", "float32"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=repo_root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not list(tmp_path.glob(".ds.partial-*/maps.npy")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "build finished before it could be interrupted"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not out.exists() and list(tmp_path.glob(".ds.partial-*"))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset_info(out)
    build_dataset(neurosynth_dir=neurosynth_dir, out=out, subset=20)
    assert len(load_dataset_info(out).metadata) == 20 and not list(tmp_path.glob(".ds.partial-*"))


def test_normalise_maps_divides_each_map_by_its_maximum() -> None:
    from cbvae_ext.data import normalise_maps

    maps = np.zeros((3, 2, 2), dtype=np.float16)
    maps[0, 0, 0], maps[0, 1, 1] = 0.5, 0.25
    maps[1, 1, 0] = 4.0
    out = normalise_maps(maps)
    assert out.dtype == torch.float32 and out.shape == (3, 2, 2)
    assert out[0].tolist() == [[1.0, 0.0], [0.0, 0.5]] and out[1, 1, 0] == 1.0
    assert not out[2].any()  # an all-zero map stays zero, no NaN
    assert torch.equal(normalise_maps(out), out)  # already scaled: unchanged
    assert torch.equal(normalise_maps(torch.from_numpy(maps)), out)
