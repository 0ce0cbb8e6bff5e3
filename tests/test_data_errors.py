"""Bad input: one-line DataError naming the file/field and the fix, nothing half-written; CLI exits 2."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nimare
import numpy as np
import pandas as pd
import pytest
import scipy.sparse

from cbvae_ext.data import DataError, build_dataset, load_dataset_info
from cbvae_ext.data.__main__ import main
from cbvae_ext.data.sources import NEUROSYNTH_FILES

STUDYSET = Path(nimare.__file__).parent / "resources" / "nback_vs_flanker_studyset_2026-07"
COORDS, META = NEUROSYNTH_FILES["coordinates"], NEUROSYNTH_FILES["metadata"]


@pytest.fixture(scope="module")
def small_source(tmp_path_factory: pytest.TempPathFactory, neurosynth_dir: Path) -> Path:
    """The first 80 real Neurosynth studies, in the v7 file layout."""
    out = tmp_path_factory.mktemp("small") / "neurosynth"
    out.mkdir()
    meta = pd.read_csv(neurosynth_dir / META, sep="\t", dtype={"id": str}).iloc[:80]
    coords = pd.read_csv(neurosynth_dir / COORDS, sep="\t", dtype={"id": str})
    meta.to_csv(out / META, sep="\t", index=False)
    coords[coords["id"].isin(meta["id"])].to_csv(out / COORDS, sep="\t", index=False)
    features = scipy.sparse.load_npz(neurosynth_dir / NEUROSYNTH_FILES["features"])[:80]
    scipy.sparse.save_npz(out / NEUROSYNTH_FILES["features"], features)
    for kind in ("vocabulary", "keys"):
        shutil.copy(neurosynth_dir / NEUROSYNTH_FILES[kind], out / NEUROSYNTH_FILES[kind])
    return out


def _edit_tsv(name: str, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        edit(pd.read_csv(folder / name, sep="\t", dtype={"id": str})).to_csv(folder / name, sep="\t", index=False)

    return apply


def _set(column: str, value, rows=slice(3, 4)):
    def edit(df: pd.DataFrame) -> pd.DataFrame:
        df = df.copy()
        df[column] = df[column].astype(object)
        df.iloc[rows, df.columns.get_loc(column)] = value
        return df

    return edit


NEUROSYNTH_CASES = {
    "missing file": (lambda f: (f / COORDS).unlink(), rf"missing file .*{COORDS}; pass --neurosynth-dir"),
    "corrupt gzip": (
        lambda f: (f / COORDS).write_bytes(b"\x1f\x8b\x08garbage" * 10),
        rf"cannot read coordinates .*{COORDS}",
    ),
    "truncated gzip": (
        lambda f: (f / META).write_bytes(gzip.compress((f / META).read_bytes())[:-40]),
        rf"cannot read metadata .*{META}",
    ),
    "corrupt npz": (
        lambda f: (f / NEUROSYNTH_FILES["features"]).write_bytes(b"PK\x03\x04 nope"),
        "cannot read topic weights",
    ),
    "missing column": (_edit_tsv(COORDS, lambda d: d.drop(columns="z")), rf"{COORDS} lacks column\(s\) z"),
    "NaN coordinate": (_edit_tsv(COORDS, _set("y", np.nan)), rf"{COORDS} has 1 peak\(s\) with NaN/inf"),
    "inf coordinate": (_edit_tsv(COORDS, _set("x", np.inf, slice(0, 2))), rf"{COORDS} has 2 peak\(s\) with NaN/inf"),
    "text coordinate": (_edit_tsv(COORDS, _set("x", "12,5")), r"NaN/inf/non-numeric"),
    "unknown space": (_edit_tsv(META, _set("space", "SPM99")), rf"{META} has unknown coordinate space label 'SPM99'"),
    "duplicate id": (
        _edit_tsv(META, lambda d: d.assign(id=[d["id"].iloc[0]] * 2 + d["id"].iloc[2:].tolist())),
        rf"{META} has duplicate study id '\d+'",
    ),
    "empty vocabulary": (
        lambda f: (f / NEUROSYNTH_FILES["vocabulary"]).write_text(""),
        r"vocab-LDA50_vocabulary.txt lists 0 topic labels but LDA50 has 50; use an unmodified copy",
    ),
    "missing keys": (
        lambda f: (f / NEUROSYNTH_FILES["keys"]).unlink(),
        r"missing file .*vocab-LDA50_keys.tsv; pass --neurosynth-dir",
    ),
    "garbled keys": (
        lambda f: (f / NEUROSYNTH_FILES["keys"]).write_text("no tabs here\n"),
        r"cannot read topic keys .*keys.tsv",
    ),
    "nothing left": (_edit_tsv(COORDS, lambda d: d.assign(x=500.0)), "no study has a peak inside the brain mask"),
}


@pytest.mark.parametrize("case", list(NEUROSYNTH_CASES))
def test_bad_neurosynth_input(case: str, small_source: Path, tmp_path: Path) -> None:
    folder = tmp_path / "src"
    shutil.copytree(small_source, folder)
    breaker, message = NEUROSYNTH_CASES[case]
    breaker(folder)
    with pytest.raises(DataError, match=message) as err:
        build_dataset(neurosynth_dir=folder, out=tmp_path / "out")
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing half-written


def _studyset_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "studyset"
    folder.mkdir()
    for name in ("analyses", "coordinates", "studies"):
        shutil.copy(STUDYSET / f"{name}.parquet", folder / f"{name}.parquet")
    return folder


def test_corrupt_parquet(tmp_path: Path) -> None:
    folder = _studyset_copy(tmp_path)
    (folder / "coordinates.parquet").write_bytes(b"PAR1 definitely not parquet PAR1")
    with pytest.raises(DataError, match=r"cannot read NeuroStore coordinates table .*coordinates.parquet"):
        build_dataset(neurosynth=False, neurostore_dirs=[folder], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_duplicate_analysis_ids(tmp_path: Path) -> None:
    folder = _studyset_copy(tmp_path)
    analyses = pd.read_parquet(folder / "analyses.parquet")
    pd.concat([analyses, analyses.iloc[:1]]).to_parquet(folder / "analyses.parquet")
    with pytest.raises(DataError, match=r"analyses.parquet has duplicate analysis id"):
        build_dataset(neurosynth=False, neurostore_dirs=[folder], out=tmp_path / "out")


def test_output_not_writable(small_source: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match=r"output folder .*a_file is not writable"):
        build_dataset(neurosynth_dir=small_source, out=blocker / "ds")
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="exists and is not a dataset folder"):
        build_dataset(neurosynth_dir=small_source, out=tmp_path / "stuff")
    assert (tmp_path / "stuff" / "notes.txt").read_text() == "keep me"


def test_bad_options(small_source: Path, tmp_path: Path) -> None:
    for kwargs, message in [
        ({"resolution": 3}, "--resolution 3 is not supported"),
        ({"kernel": "kda"}, "--kernel 'kda' is not supported"),
        ({"subset": 0}, "--subset 0 is too small; use at least 10"),
        ({"subset": 1}, "--subset 1 is too small; use at least 10"),
        ({"dtype": "int8"}, "--dtype 'int8'"),
        ({"kernel_fwhm_mm": -1.0}, r"--kernel-fwhm -1 is outside the valid range \(0, 60\] mm"),
        ({"kernel_fwhm_mm": 1e12}, r"--kernel-fwhm 1e\+12 is outside the valid range \(0, 60\] mm"),
        ({"kernel": "mkda", "radius": 1e5}, r"--radius 100000 is outside the valid range \(0, 60\] mm"),
    ]:
        with pytest.raises(DataError, match=message):
            build_dataset(neurosynth_dir=small_source, out=tmp_path / "out", **kwargs)


def test_cli_prints_one_line_and_exits_2(small_source: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "src"
    shutil.copytree(small_source, folder)
    _edit_tsv(META, _set("space", "SPM99"))(folder)
    assert main(["build", "--neurosynth-dir", str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {folder / META} has unknown coordinate space label 'SPM99'; use MNI, TAL or UNKNOWN "
                   "(OTHER/empty = UNKNOWN)"]  # fmt: skip


def test_cli_subprocess_no_traceback(tmp_path: Path, repo_root: Path) -> None:
    missing = tmp_path / "nowhere"
    proc = subprocess.run(
        [sys.executable, "-m", "cbvae_ext.data", "build", "--neurosynth-dir", str(missing), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=repo_root, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: neurosynth folder {missing} does not exist; check --neurosynth-dir"
    ]
    assert not (tmp_path / "o").exists()


def test_refuses_to_replace_a_folder_that_is_not_ours(small_source: Path, tmp_path: Path) -> None:
    """A folder with a foreign manifest.json (a web project) is never replaced; nothing in it is lost."""
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "manifest.json").write_text('{"name": "my-app"}')
    (project / "src" / "main.js").write_text("console.log(1)")
    (project / "README.md").write_text("mine")
    with pytest.raises(DataError, match=r"exists and is not a dataset folder \(no cbvae dataset manifest\)"):
        build_dataset(neurosynth_dir=small_source, out=project)
    assert sorted(str(p.relative_to(project)) for p in project.rglob("*")) == [
        "README.md", "manifest.json", "src", "src/main.js",
    ]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]  # no temporary folder left
    # a dataset of ours with a user's file beside it is refused too; without it, it is replaced
    ours = build_dataset(neurosynth_dir=small_source, out=tmp_path / "ours", subset=40)
    (ours / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match=r"holds files that are not part of the dataset \(notes.txt\)"):
        build_dataset(neurosynth_dir=small_source, out=ours, subset=50)
    (ours / "notes.txt").unlink()
    assert len(load_dataset_info(build_dataset(neurosynth_dir=small_source, out=ours, subset=50)).metadata) == 50
    # a format-1 build (before the marker) is recognised by its builder keys and replaced
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "manifest.json").write_text('{"format_version": 1, "cache_key": "old", "grid": {}, "schema": {}}')
    (legacy / "maps.npy").write_bytes(b"old")
    assert len(load_dataset_info(build_dataset(neurosynth_dir=small_source, out=legacy, subset=20)).metadata) == 20


def test_build_killed_between_renames_is_recovered(small_source: Path, tmp_path: Path) -> None:
    """``out`` moved aside to ``.out.old-<pid>`` by a build that died: the next build restores or cleans it."""
    out = build_dataset(neurosynth_dir=small_source, out=tmp_path / "ds", subset=30)
    created = load_dataset_info(out).manifest["created"]
    orphan = tmp_path / ".ds.old-999999999"  # no such process
    out.rename(orphan)
    build_dataset(neurosynth_dir=small_source, out=out, subset=30)
    assert load_dataset_info(out).manifest["created"] == created  # the previous build is back (and reused)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    shutil.copytree(out, orphan)  # an orphan beside a complete build is stale: removed
    build_dataset(neurosynth_dir=small_source, out=out, subset=30)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_implausible_years_become_missing_and_are_counted(small_source: Path, tmp_path: Path) -> None:
    folder = tmp_path / "src"
    shutil.copytree(small_source, folder)
    _edit_tsv(META, lambda d: d.assign(year=[1e9, -5] + d["year"].iloc[2:].tolist()))(folder)
    info = load_dataset_info(build_dataset(neurosynth_dir=folder, out=tmp_path / "out"))
    counts = info.manifest["counts"]["neurosynth"]["implausible_values_set_missing"]
    assert counts == {"year": 2}
    first_two = info.metadata["id"].isin(
        "neurosynth:" + pd.read_csv(folder / META, sep="\t", dtype={"id": str})["id"][:2]
    )
    assert first_two.sum() == 2 and info.metadata.loc[first_two, "year"].isna().all()
    assert not info.metadata.loc[first_two, "year_observed"].any()
    year = info.schema.field("year")
    assert 1997 <= year.low and year.high <= 2018 and np.isfinite(year.center)


def test_negative_sample_sizes_become_missing(tmp_path: Path) -> None:
    folder = _studyset_copy(tmp_path)
    shutil.copy(STUDYSET / "annotations.parquet", folder / "annotations.parquet")
    ann = pd.read_parquet(folder / "annotations.parquet")
    col = "ParticipantDemographicsExtractor.groups[0].count"
    reported = np.flatnonzero(pd.to_numeric(ann[col], errors="coerce").notna().to_numpy())[:3]
    ann[col] = ann[col].astype(object)
    for r in reported:
        ann.iloc[r, ann.columns.get_loc(col)] = -float(abs(pd.to_numeric(ann[col].iloc[r])) + 50)
    for name in list(ann.columns):  # the other groups of those analyses would add to the sum
        if name.startswith("ParticipantDemographicsExtractor.groups[") and name.endswith("].count") and name != col:
            ann.iloc[reported, ann.columns.get_loc(name)] = None
    ann.to_parquet(folder / "annotations.parquet")
    info = load_dataset_info(build_dataset(neurosynth=False, neurostore_dirs=[folder], out=tmp_path / "out"))
    name = next(iter(info.manifest["counts"]))
    assert info.manifest["counts"][name]["implausible_values_set_missing"] == {"sample_size": 3}
    sizes = info.metadata["sample_size"].dropna()
    assert (sizes >= 1).all()
    spec = info.schema.field("sample_size")
    assert np.isfinite(spec.center) and np.isfinite(spec.scale) and spec.scale > 0


def test_too_few_studies_for_the_splits(tmp_path: Path) -> None:
    folder = _studyset_copy(tmp_path)
    analyses = pd.read_parquet(folder / "analyses.parquet")
    keep = analyses["study_id"].isin(analyses["study_id"].unique()[:3])
    analyses[keep].to_parquet(folder / "analyses.parquet")
    with pytest.raises(
        DataError, match=r"leaves the (val/test|val|test|train/val/test)[^ ]* split empty; give at least 10"
    ):
        build_dataset(neurosynth=False, neurostore_dirs=[folder], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--kernel-fwhm", "--fwhm"])
def test_kernel_fwhm_option_and_alias(flag: str, small_source: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["build", "--neurosynth-dir", str(small_source), "--out", str(out), "--subset", "20", flag, "8"]) == 0
    assert load_dataset_info(out).manifest["kernel"]["kernel_fwhm_mm"] == 8.0
    assert main(["build", "--neurosynth-dir", str(small_source), "--out", str(out), flag, "1e12"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --kernel-fwhm 1e+12 is outside the valid range (0, 60] mm; choose e.g. 10"
    ]
