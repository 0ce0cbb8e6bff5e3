"""The dataset folder as a set of files: schema-aware cache, checksums checked on open, the output lock,
stale temporary folders, a symlinked --out, impossible topic weights, and ``data info`` on broken folders.

Built from the committed Neurosynth fixture (306 real studies): fast, and the same on every machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse
from conftest import FIXTURE_NEUROSYNTH

import cbvae_ext.data.categories as categories
import cbvae_ext.schema as schema_module
from cbvae_ext.data import DataError, build_dataset, check_dataset_files, load_dataset_info
from cbvae_ext.data.__main__ import main
from cbvae_ext.data.categories import topic_categories
from cbvae_ext.data.sources import NEUROSYNTH_FILES

FIX = "rebuild it: python -m cbvae_ext.data build --out {} --force (with the options it was built with)"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole fixture at 4 mm (each test edits a copy)."""
    return build_dataset(neurosynth_dir=FIXTURE_NEUROSYNTH, out=tmp_path_factory.mktemp("folder") / "ds")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 studies: cheap to copy for each broken-folder case."""
    return build_dataset(neurosynth_dir=FIXTURE_NEUROSYNTH, out=tmp_path_factory.mktemp("folder") / "small", subset=20)


def _copy(built: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(built, out)
    return out


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _rerecord(folder: Path) -> None:
    """Record the (edited) files' checksums, as a buggy build would: the parsing checks must still hold."""
    from cbvae_ext.data.folder import file_checksums

    manifest = _manifest(folder)
    manifest["files"] = file_checksums(folder, list(manifest["files"]))
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _one_line_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ----- the cache key covers the schema's declarations and the category rules ----------------------------------
def test_schema_or_category_rule_change_rebuilds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = build_dataset(neurosynth_dir=FIXTURE_NEUROSYNTH, out=tmp_path / "ds", subset=30)
    first = _manifest(out)
    build_dataset(neurosynth_dir=FIXTURE_NEUROSYNTH, out=out, subset=30)
    assert _manifest(out)["created"] == first["created"]  # unchanged: reused
    # a declared field changes (its plausible range): the dataset is rebuilt, not reused
    year = schema_module.FIELDS[0]
    changed = (dataclasses.replace(year, plausible_high=2020.0), *schema_module.FIELDS[1:])
    monkeypatch.setattr(schema_module, "FIELDS", changed)
    build_dataset(neurosynth_dir=FIXTURE_NEUROSYNTH, out=out, subset=30)
    second = _manifest(out)
    assert second["cache_key"] != first["cache_key"]
    assert second["schema_fingerprint"] == schema_module.declaration_fingerprint() != first["schema_fingerprint"]
    # a new field declared: rebuilt again
    extra = dataclasses.replace(year, name="echo_time", label="Echo time (ms)")
    monkeypatch.setattr(schema_module, "FIELDS", (*changed, extra))
    build_dataset(neurosynth_dir=FIXTURE_NEUROSYNTH, out=out, subset=30)
    third = _manifest(out)
    assert third["cache_key"] not in (first["cache_key"], second["cache_key"])
    # a category rule changes: rebuilt
    monkeypatch.setattr(categories, "TOPIC_THRESHOLD", 0.5)
    build_dataset(neurosynth_dir=FIXTURE_NEUROSYNTH, out=out, subset=30)
    assert _manifest(out)["cache_key"] != third["cache_key"]
    assert _manifest(out)["category_table"]["neurosynth_topic_threshold"] == 0.5


# ----- a folder edited after its build is refused when opened -----------------------------------------------------
def test_reordered_metadata_is_refused(built: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = _copy(built, tmp_path)
    pd.read_parquet(out / "metadata.parquet").iloc[::-1].to_parquet(out / "metadata.parquet", index=False)
    with pytest.raises(DataError) as err:
        load_dataset_info(out)
    message = str(err.value)
    changed = r"(is \d+ bytes where manifest.json records \d+|has another sha256 than manifest.json records)"
    pattern = rf"dataset folder {re.escape(str(out))}: metadata.parquet {changed} \(edited after the build\); "
    assert re.fullmatch(pattern + re.escape(FIX.format(out)), message), message
    assert _one_line_error(capsys, ["info", str(out)]) == f"error: {message}"
    with pytest.raises(DataError, match=re.escape(message)):  # for readers of the raw files (the app)
        check_dataset_files(out)


def test_reordered_or_truncated_maps_are_refused(built: Path, tmp_path: Path) -> None:
    out = _copy(built, tmp_path)
    maps = np.load(out / "maps.npy")
    np.save(out / "maps.npy", maps[::-1])  # same size, rows swapped: caught by the sampled hash
    with pytest.raises(DataError, match=r"maps.npy has another sampled sha256 than manifest.json records"):
        load_dataset_info(out)
    np.save(out / "maps.npy", maps[:-1])
    with pytest.raises(DataError, match=rf"maps.npy is {(out / 'maps.npy').stat().st_size} bytes where manifest"):
        load_dataset_info(out)
    np.save(out / "maps.npy", maps)
    assert len(load_dataset_info(out, full_check=True).metadata) == len(maps)  # the original bytes load again


def test_edited_folder_is_rebuilt_not_reused(built: Path, tmp_path: Path) -> None:
    """The build's own cache check verifies the files: an edited folder with the right key is rebuilt."""
    out = _copy(built, tmp_path)
    original = pd.read_parquet(out / "metadata.parquet")
    original.iloc[::-1].to_parquet(out / "metadata.parquet", index=False)
    build_dataset(neurosynth_dir=FIXTURE_NEUROSYNTH, out=out)
    info = load_dataset_info(out)
    pd.testing.assert_frame_equal(info.metadata, original)


# ----- one build per --out at a time ---------------------------------------------------------------------------
_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
time.sleep(120)
"""


def test_second_build_into_one_out_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ds"
    argv = ["build", "--neurosynth-dir", str(FIXTURE_NEUROSYNTH), "--out", str(out), "--subset", "20"]
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path / ".ds.lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert _one_line_error(capsys, argv) == (
            f"error: another build is writing {out} (process {holder.pid}, lock .ds.lock); wait for it to finish "
            "or choose another --out"
        )
        assert not out.exists()
        holder.send_signal(signal.SIGKILL)  # the kernel drops a killed holder's lock
        holder.wait(timeout=30)
    finally:
        holder.kill()
        holder.wait()
    assert main(argv) == 0 and len(load_dataset_info(out).metadata) == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # the lock file went with the build


# ----- temporary folders and a symlinked --out ---------------------------------------------------------------------
def test_stale_partials_are_cleaned_even_on_a_cache_hit(tmp_path: Path) -> None:
    out = build_dataset(neurosynth_dir=FIXTURE_NEUROSYNTH, out=tmp_path / "ds", subset=20)
    for pid in ("999999999", str(os.getpid())):  # a dead build's, and one whose PID is in use again
        partial = tmp_path / f".ds.partial-{pid}"
        partial.mkdir()
        (partial / "maps.npy").write_bytes(b"\0" * 4096)
    created = _manifest(out)["created"]
    assert build_dataset(neurosynth_dir=FIXTURE_NEUROSYNTH, out=out, subset=20) == out
    assert _manifest(out)["created"] == created  # reused
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_symlinked_out_stays_a_link(tmp_path: Path) -> None:
    target = tmp_path / "disk" / "ds"
    target.parent.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    assert build_dataset(neurosynth_dir=FIXTURE_NEUROSYNTH, out=link, subset=20) == link
    build_dataset(neurosynth_dir=FIXTURE_NEUROSYNTH, out=link, subset=30)
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert len(load_dataset_info(link).metadata) == 30 == len(load_dataset_info(target).metadata)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "link"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["ds"]


# ----- impossible LDA topic weights are missing, never a category's evidence --------------------------------------
def test_impossible_topic_weights_become_missing(built: Path, tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(FIXTURE_NEUROSYNTH, source)
    path = source / NEUROSYNTH_FILES["features"]
    weights = scipy.sparse.load_npz(path).toarray()
    ids = "neurosynth:" + pd.read_csv(source / NEUROSYNTH_FILES["metadata"], sep="\t", dtype={"id": str})["id"]
    kept = np.flatnonzero(ids.isin(load_dataset_info(built).metadata["id"]).to_numpy())
    bad = kept[:5]  # studies with peaks, so they stay in the dataset
    for row, value in zip(bad, (-5.0, 1e300, np.inf, np.nan, 3.0), strict=True):
        weights[row, 9] = value  # topic 9 is working memory's
    scipy.sparse.save_npz(path, scipy.sparse.csc_matrix(weights))
    info = load_dataset_info(build_dataset(neurosynth_dir=source, out=tmp_path / "ds"))
    assert info.manifest["counts"]["neurosynth"]["implausible_values_set_missing"] == {"topics": 5}
    meta = info.metadata.set_index("id")
    hit = meta.loc[ids.iloc[bad]]
    assert not hit["topics_observed"].any() and not hit["category_observed"].any() and hit["category"].isna().all()
    assert (hit[[f"topic_{i:02d}" for i in range(50)]].to_numpy() == 0).all()
    rows = meta.index.get_indexer(ids.iloc[bad])
    _, mask = info.encode(rows)
    assert (mask[:, info.schema.group("topics").mask_index] == 0).all()
    assert (mask[:, info.schema.group("task").mask_index] == 0).all()
    # every other study keeps its weights and category
    others = meta.drop(index=ids.iloc[bad])
    clean = load_dataset_info(built).metadata.set_index("id").loc[others.index]
    assert others["topics_observed"].all() and list(others["category"]) == list(clean["category"])
    assert topic_categories(np.array([[np.nan] * 50, [0.0] * 50])) == [None, None]


# ----- `data info` on a broken folder: one line ------------------------------------------------------------------
def _set_manifest(**entries):
    def edit(folder: Path) -> None:
        (folder / "manifest.json").write_text(json.dumps({**_manifest(folder), **entries}))

    return edit


def _drop_column(column: str):
    def edit(folder: Path) -> None:
        pd.read_parquet(folder / "metadata.parquet").drop(columns=column).to_parquet(folder / "metadata.parquet")
        _rerecord(folder)

    return edit


def _retype_column(column: str):
    def edit(folder: Path) -> None:
        meta = pd.read_parquet(folder / "metadata.parquet")
        meta[column] = meta[column].astype(str)
        meta.to_parquet(folder / "metadata.parquet")
        _rerecord(folder)

    return edit


def _replace(name: str, data: bytes, rerecord: bool = False):
    def edit(folder: Path) -> None:
        (folder / name).write_bytes(data)
        if rerecord:
            _rerecord(folder)

    return edit


def _truncate(name: str):
    def edit(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])

    return edit


INFO_CASES = {
    "missing folder": (lambda f: shutil.rmtree(f), r"dataset folder .* does not exist"),
    "missing maps": (lambda f: (f / "maps.npy").unlink(), r"is incomplete \(missing maps.npy\)"),
    "missing manifest": (lambda f: (f / "manifest.json").unlink(), r"is incomplete \(missing manifest.json\)"),
    "truncated manifest": (_truncate("manifest.json"), r"has an unreadable manifest.json"),
    "binary manifest": (_replace("manifest.json", b"\xff\xfe\x00garbage"), r"has an unreadable manifest.json"),
    "manifest is a list": (_replace("manifest.json", b"[1, 2]"), r"manifest.json is not a cbvae dataset manifest"),
    "format version 99": (_set_manifest(format_version=99), r"has format version 99, newer than this cbvae_ext"),
    "format version 2": (_set_manifest(format_version=2), r"has format version 2, from an older cbvae_ext"),
    "version is text": (_set_manifest(format_version="3"), r"has format version '3', from an older cbvae_ext"),
    "files is a list": (_set_manifest(files=[]), r"malformed manifest.json \('files' must list"),
    "size is text": (
        lambda f: _set_manifest(files={**_manifest(f)["files"], "mask.nii.gz": {"size": "1", "sha256": "x"}})(f),
        r"'files' entry 'mask.nii.gz' needs size, sha256",
    ),
    "schema is text": (_set_manifest(schema="year"), r"malformed manifest.json \('schema' must be a dict\)"),
    "schema lacks fields": (_set_manifest(schema={"categories": []}), r"is unreadable \(metadata schema is malformed"),
    "unrecorded terms": (_replace("terms.npz", b"PK"), r"holds terms.npz, which its manifest.json does not list"),
    "truncated maps": (_truncate("maps.npy"), r"maps.npy is \d+ bytes where manifest.json records \d+"),
    "truncated metadata": (_truncate("metadata.parquet"), r"metadata.parquet is \d+ bytes where manifest.json"),
    "truncated mask": (_truncate("mask.nii.gz"), r"mask.nii.gz is \d+ bytes where manifest.json"),
    "maps not npy": (_replace("maps.npy", b"not an npy file", rerecord=True), r"is unreadable \("),
    "metadata not parquet": (_replace("metadata.parquet", b"PAR1 nope", rerecord=True), r"is unreadable \("),
    "mask not nifti": (_replace("mask.nii.gz", b"\x1f\x8b garbage", rerecord=True), r"is unreadable \("),
    "split column dropped": (_drop_column("split"), r"metadata.parquet lacks column\(s\) split"),
    "year as text": (_retype_column("year"), r"metadata.parquet has column\(s\) year of the wrong type"),
    "unknown category": (
        lambda f: (
            pd.read_parquet(f / "metadata.parquet").assign(category="astrology").to_parquet(f / "metadata.parquet"),
            _rerecord(f),
        ),
        r"metadata.parquet has unknown category value\(s\) \['astrology'\]",
    ),
}


@pytest.mark.parametrize("case", list(INFO_CASES))
def test_info_on_a_broken_folder_is_one_line(
    case: str, small: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = _copy(small, tmp_path)
    breaker, message = INFO_CASES[case]
    breaker(out)
    line = _one_line_error(capsys, ["info", str(out)])
    assert re.search(message, line), line
    assert line.endswith("--force (with the options it was built with)") or "does not exist" in line


def test_info_prints_counts_of_an_intact_folder(built: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["info", str(built)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["n_maps"] == len(load_dataset_info(built).metadata) and printed["kernel"]["kernel_fwhm_mm"] == 10.0
