"""The user's own study: real Neurosynth studies written out in each format and read back, bad input, and the CLI.

The equality tests compare with the dataset's own ``maps.npy`` rows: a dataset study written as a Sleuth file,
a CSV or a NiMARE JSON and read back must give exactly its map in the dataset (same peaks, grid, kernel, dtype).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import BUNDLE_ENV, run_python
from study_files import (
    test_split_studies,
    write_csv,
    write_nimare_json,
    write_sleuth,
    write_studyset_json,
)

from cbvae_ext.data import load_dataset_info
from cbvae_ext.study import MAX_PEAKS, StudyContext, StudyError, analyse_file, read_studies


@pytest.fixture(scope="module")
def dataset(tiny_dataset: Path):
    return load_dataset_info(tiny_dataset)


@pytest.fixture(scope="module")
def context(tiny_runs: dict[str, Path], tiny_dataset: Path) -> StudyContext:
    return StudyContext.open(tiny_runs["cbvae"], tiny_dataset, k=4, cache=False)


@pytest.fixture(scope="module")
def real_studies(dataset, neurosynth_dir: Path) -> dict[str, dict]:
    """One MNI and one Talairach test-split study of the tiny dataset, with their peaks as Neurosynth lists them."""
    return test_split_studies(dataset.metadata, neurosynth_dir)


# ----- the same study in every format -----------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["sleuth", "csv", "tsv", "nimare_json", "studyset_json"])
@pytest.mark.parametrize("space", ["MNI", "TAL"])
def test_dataset_study_read_back_gives_its_dataset_map(
    tmp_path: Path, fmt: str, space: str, real_studies: dict, context: StudyContext, dataset
) -> None:
    study = real_studies[space]
    name, xyz = "real study", study["xyz"]
    label = {"MNI": "MNI", "TAL": "Talairach"}[space] if fmt == "sleuth" else space
    path = {
        "sleuth": lambda: write_sleuth(tmp_path / "s.txt", [(name, xyz)], label),
        "csv": lambda: write_csv(tmp_path / "s.csv", [(name, xyz, label)]),
        "tsv": lambda: write_csv(tmp_path / "s.tsv", [(name, xyz, label)], sep="\t"),
        "nimare_json": lambda: write_nimare_json(tmp_path / "s.json", [(name, xyz, label)]),
        "studyset_json": lambda: write_studyset_json(tmp_path / "s.json", [(name, xyz, label)]),
    }[fmt]()
    (read,) = read_studies(path)
    assert read.space == space
    np.testing.assert_allclose(read.xyz_given, xyz, atol=1e-9)
    if space == "TAL":  # converted exactly as the builder converts Neurosynth's Talairach studies
        from nimare.utils import tal2mni

        np.testing.assert_allclose(read.xyz, tal2mni(xyz), atol=1e-9)
        assert not np.allclose(read.xyz, xyz)
    ma, counts = context.render(read.xyz)
    assert counts["read"] == len(xyz)
    np.testing.assert_array_equal(ma, np.asarray(dataset.maps[study["row"]], dtype=np.float32))


def test_many_studies_in_one_file_and_their_metadata(tmp_path: Path, real_studies: dict) -> None:
    mni, tal = real_studies["MNI"], real_studies["TAL"]
    frame = pd.concat(
        [
            pd.DataFrame(mni["xyz"], columns=["X", "Y", "Z"]).assign(Space="MNI", Study="a", Year=2010, N=24),
            pd.DataFrame(tal["xyz"], columns=["X", "Y", "Z"]).assign(Space="TAL", Study="b", Task="pain"),
        ]
    )
    frame.to_csv(tmp_path / "two.csv", index=False)
    a, b = read_studies(tmp_path / "two.csv")
    assert (a.name, a.space, a.n_peaks, b.name, b.space, b.n_peaks) == (
        "a",
        "MNI",
        len(mni["xyz"]),
        "b",
        "TAL",
        len(tal["xyz"]),
    )
    assert a.metadata == {"year": 2010.0, "sample_size": 24.0, "task": None, "text": None}
    assert b.metadata["task"] == "pain" and b.metadata["year"] is None
    (s,) = read_studies(write_sleuth(tmp_path / "s.txt", [("Smith et al., 2010: faces", mni["xyz"])], "MNI", 17))
    assert s.metadata["sample_size"] == 17.0 and s.name == "Smith et al., 2010; faces"


def test_three_talairach_peaks_log_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """NiMARE's tal2mni logs an "ambiguous 3x3 matrix" note for 3 peaks; the CLI's stderr must stay one line."""
    xyz = np.array([[-18.0, -58.0, -24.0], [26.0, -64.0, -50.0], [12.0, -70.0, -42.0]])
    with caplog.at_level("INFO"):
        (study,) = read_studies(write_sleuth(tmp_path / "t.txt", [("three", xyz)], "Talairach"))
    assert study.space == "TAL" and study.xyz.shape == (3, 3) and not np.allclose(study.xyz, xyz)
    assert not [r for r in caplog.records if r.name.startswith("nimare")]


def test_nimare_shipped_files_are_read(tmp_path: Path) -> None:
    """The NiMARE resources' own studyset and dataset JSON (real files) through our readers."""
    import nimare

    res = Path(nimare.__file__).parent / "resources"
    laird = read_studies(res / "neurosynth_laird_studyset.json")
    assert len(laird) == 17 and all(s.space == "MNI" and s.n_peaks > 0 for s in laird)
    assert laird[0].metadata["year"] == 2006.0 and "rTMS" in laird[0].metadata["text"]
    pain = read_studies(res / "nidm_pain_dset.json")
    assert len(pain) == 21 and pain[0].metadata["sample_size"] == 25.0
    parquet = read_studies(res / "neurostore_parquet_studyset")
    assert parquet and all(s.format == "neurostore_parquet" for s in parquet)


# ----- bad input: one line naming the problem and the fix ---------------------------------------------------
def _one_line(excinfo: pytest.ExceptionInfo, *words: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for word in words:
        assert word.lower() in message.lower(), message


def test_unknown_space(tmp_path: Path, real_studies: dict) -> None:
    xyz = real_studies["MNI"]["xyz"]
    with pytest.raises(StudyError) as e:
        read_studies(write_sleuth(tmp_path / "s.txt", [("a", xyz)], "Colin27"))
    _one_line(e, "unknown coordinate space", "'Colin27'", "use MNI or TAL")
    with pytest.raises(StudyError) as e:
        read_studies(write_csv(tmp_path / "s.csv", [("a", xyz, "ICBM-Foo")]))
    _one_line(e, "unknown coordinate space", "use MNI or TAL")
    pd.DataFrame(xyz, columns=["x", "y", "z"]).to_csv(tmp_path / "nospace.csv", index=False)
    with pytest.raises(StudyError) as e:
        read_studies(tmp_path / "nospace.csv")
    _one_line(e, "gives no coordinate space", "--space MNI")
    assert read_studies(tmp_path / "nospace.csv", space="mni")[0].space == "MNI"
    with pytest.raises(StudyError) as e:
        read_studies(tmp_path / "nospace.csv", space="colin")
    _one_line(e, "--space", "use MNI or TAL")


def test_mixed_spaces(tmp_path: Path, real_studies: dict) -> None:
    xyz = real_studies["MNI"]["xyz"]
    frame = pd.DataFrame(xyz, columns=["x", "y", "z"]).assign(
        space=["MNI", "TAL"] * (len(xyz) // 2) + ["MNI"] * (len(xyz) % 2)
    )
    frame.to_csv(tmp_path / "mixed.csv", index=False)
    with pytest.raises(StudyError) as e:
        read_studies(tmp_path / "mixed.csv")
    _one_line(e, "mixes spaces", "MNI and TAL", "split it")
    text = write_sleuth(tmp_path / "a.txt", [("a", xyz)], "MNI").read_text()
    (tmp_path / "two.txt").write_text(text + "\n// Reference=Talairach\n// b\n// Subjects=10\n1 2 3\n")
    with pytest.raises(StudyError) as e:
        read_studies(tmp_path / "two.txt")
    _one_line(e, "second space header", "mixed spaces", "one sleuth file per space")
    path = write_studyset_json(tmp_path / "m.json", [("a", xyz[:2], "MNI")])
    doc = json.loads(path.read_text())
    doc["studies"][0]["analyses"][0]["points"][1]["space"] = "TAL"
    path.write_text(json.dumps(doc))
    with pytest.raises(StudyError) as e:
        read_studies(path)
    _one_line(e, "mixes spaces")


def test_empty_tables_and_unreadable_files(tmp_path: Path) -> None:
    (tmp_path / "header.csv").write_text("x,y,z,space\n")
    (tmp_path / "blank.csv").write_text("")
    (tmp_path / "blank.txt").write_text("\n\n")
    (tmp_path / "noheader.txt").write_text("1 2 3\n")
    (tmp_path / "nopeaks.txt").write_text("// Reference=MNI\n// a\n// Subjects=3\n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81" * 64)
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b not a nifti")
    (tmp_path / "wrongcols.csv").write_text("a,b,c\n1,2,3\n")
    (tmp_path / "words.csv").write_text("x,y,z,space\n1,two,3,MNI\n")
    cases = {
        "header.csv": ("no peaks", "add one row per peak"),
        "blank.csv": ("empty",),
        "blank.txt": ("empty", "reference=mni"),
        "noheader.txt": ("space header", "first line"),
        "nopeaks.txt": ("no peaks",),
        "binary.txt": ("cannot read",),
        "broken.json": ("not valid json",),
        "broken.nii.gz": ("not a readable nifti",),
        "wrongcols.csv": ("no column x, y, z", "name the coordinate columns"),
        "words.csv": ("must be numbers",),
        "missing.txt": ("does not exist",),
        "peaks.xlsx": ("unknown file type",),
    }
    (tmp_path / "peaks.xlsx").write_bytes(b"PK")
    for name, words in cases.items():
        with pytest.raises(StudyError) as e:
            read_studies(tmp_path / name)
        _one_line(e, *words)


def test_peak_limit(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    big = rng.uniform(-60, 60, size=(10_000, 3)).round(1)
    path = write_csv(tmp_path / "big.csv", [("one", big, "MNI")])
    with pytest.raises(StudyError) as e:
        read_studies(path)
    _one_line(e, "10000 peaks", f"limit of {MAX_PEAKS}", "--max_peaks 10000")
    assert read_studies(path, max_peaks=10_000)[0].n_peaks == 10_000
    many = write_csv(tmp_path / "many.csv", [(f"s{i}", big[i * 500 : (i + 1) * 500], "MNI") for i in range(20)])
    assert [s.n_peaks for s in read_studies(many)] == [500] * 20  # 10,000 peaks in 20 studies: accepted


def test_peaks_outside_the_brain(tmp_path: Path, real_studies: dict, context: StudyContext) -> None:
    xyz = real_studies["MNI"]["xyz"]
    outside = np.array([[0.0, 0.0, 95.0], [70.0, -20.0, 30.0]])  # above the vertex; just beyond the right cortex
    path = write_sleuth(tmp_path / "s.txt", [("a", np.vstack([xyz, outside]))], "MNI")
    dropped = analyse_file(path, context=context, readings=False).results[0]
    assert dropped.peaks == {"read": len(xyz) + 2, "inside_mask": len(xyz), "outside_mask": 2, "used": len(xyz)}
    assert any(f"2 of {len(xyz) + 2} peaks lie outside the brain mask and were dropped" in w for w in dropped.warnings)
    # the typicality counts each dropped peak at the least likely voxel's density
    log_d, inside = context.log_density().numpy(), dropped.ma_map[context.grid.mask]
    peak = inside >= inside.max() * (1 - 1e-6)
    assert dropped.typicality["n_peak_voxels"] == peak.sum() + 2
    expected = (log_d[peak].sum() + 2 * log_d.min()) / (peak.sum() + 2)
    assert dropped.typicality["score_nats"] == pytest.approx(expected, rel=1e-5)
    kept = analyse_file(path, context=context, outside="keep", readings=False).results[0]
    assert kept.peaks["used"] == len(xyz) + 2 and any("were kept" in w for w in kept.warnings)
    assert (kept.ma_map >= dropped.ma_map).all() and (kept.ma_map > dropped.ma_map).any()  # the kept peak's kernel
    with pytest.raises(StudyError) as e:
        analyse_file(write_sleuth(tmp_path / "out.txt", [("a", outside)], "MNI"), context=context)
    _one_line(e, "none of its 2 peaks lies inside the brain mask", "check the space")


def test_map_on_another_grid_is_resampled(tmp_path: Path, real_studies: dict, context: StudyContext) -> None:
    from cbvae_ext.data.grid import make_grid
    from cbvae_ext.data.kernels import KernelSpec, render_maps

    xyz = real_studies["MNI"]["xyz"]
    fine = make_grid(2)
    ijk = fine.voxels(xyz)
    ijk = ijk[fine.in_mask(ijk)]
    map2 = next(render_maps(KernelSpec().cube(fine), ijk, np.zeros(len(ijk), np.int64), 1, fine.mask, 1))[0]
    nib.save(nib.Nifti1Image(map2.astype(np.float32), fine.affine), tmp_path / "map2mm.nii.gz")
    result = analyse_file(tmp_path / "map2mm.nii.gz", context=context).results[0]
    assert any("resampled with nilearn" in n and "[96, 112, 96] at 2x2x2 mm" in n for n in result.notes), result.notes
    expected, _ = context.render(xyz)
    r = np.corrcoef(result.ma_map[context.grid.mask], expected[context.grid.mask])[0, 1]
    assert r > 0.9, r  # the 2 mm kernel and mask, resampled to 4 mm
    # a map already on the run's grid is taken as it is
    nib.save(nib.Nifti1Image(expected, context.grid.affine), tmp_path / "map4mm.nii.gz")
    same = analyse_file(tmp_path / "map4mm.nii.gz", context=context).results[0]
    assert not any("resampled" in n for n in same.notes)
    np.testing.assert_array_equal(same.ma_map, expected)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)), tmp_path / "four_d.nii.gz")
    with pytest.raises(StudyError) as e:
        read_studies(tmp_path / "four_d.nii.gz")
    _one_line(e, "one 3d map")


# ----- what the model says --------------------------------------------------------------------------------
def test_typicality_of_a_test_study_is_its_reference_score(
    tmp_path: Path, real_studies: dict, context: StudyContext
) -> None:
    study = real_studies["MNI"]
    analysis = analyse_file(write_sleuth(tmp_path / "s.txt", [("a", study["xyz"])], "MNI"), context=context)
    (result,), (report,) = analysis.results, analysis.reports
    ref = context.reference()
    own = float(ref["score"][list(ref["ids"]).index(study["id"])])
    typ = report["typicality"]
    assert typ["score_nats"] == pytest.approx(own, rel=1e-5, abs=1e-3)
    score = typ["score_nats"]  # equal to its reference score up to summation order, so rank that one
    expected = 100 * (np.sum(ref["score"] < score) + 0.5 * np.sum(ref["score"] == score)) / len(ref["score"])
    assert typ["percentile"] == pytest.approx(expected, abs=0.01)
    assert typ["n_reference"] == len(context.dataset.rows("test")) and typ["k"] == 4
    assert typ["elbo_nats"] < 0 and typ["score"] == "peak_density"
    # the default score: mean log prior-predictive density at the study's peak voxels (a density: below 0)
    log_d = context.log_density().numpy()
    assert np.exp(log_d).sum() == pytest.approx(1.0) and typ["score_nats"] == typ["peak_density_nats_per_peak"] < 0
    peak = result.ma_map[context.grid.mask] >= result.ma_map.max() * (1 - 1e-6)
    assert typ["n_peak_voxels"] == peak.sum() > 0
    assert typ["score_nats"] == pytest.approx(log_d[peak].mean(), rel=1e-5)
    elbo = StudyContext(context.model, context.grid, context.kernel, context.dataset, k=4, typicality_score="elbo")
    assert elbo.score(result.ma_map[None])["score"][0] == pytest.approx(typ["elbo_nats"] + typ["entropy_floor_nats"])
    with pytest.raises(StudyError) as e:
        StudyContext(context.model, context.grid, context.kernel, typicality_score="likelihood")
    _one_line(e, "--typicality_score 'likelihood' is not a score; use one of peak_density, elbo")
    assert report["nearest"][0]["id"] == study["id"] and report["nearest"][0]["r"] == pytest.approx(1.0, abs=1e-4)
    assert set(result.readings) == {"x_flipped", "talairach_labelled_mni"}
    assert (
        len(result.posterior["mu"]) == context.model.latent_size and result.reconstruction.shape == context.grid.shape
    )
    assert report["conditions"] == {"sample_size": 20.0}
    # the app's path: the uploaded bytes with their name, the same report, and the files as one zip
    upload = analyse_file((tmp_path / "s.txt").read_bytes(), filename="mine.txt", context=context, readings=False)
    assert upload.reports[0]["typicality"]["score_nats"] == pytest.approx(typ["score_nats"], rel=1e-6)
    import io
    import zipfile

    names = zipfile.ZipFile(io.BytesIO(upload.zip_bytes())).namelist()
    assert "report.json" in names and "001-a/reconstruction.nii.gz" in names and "001-a/ma_map.json" in names


def test_run_without_encoder_says_so(
    tmp_path: Path, tiny_runs: dict[str, Path], tiny_dataset: Path, real_studies: dict
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_runs["cbvae"], run, ignore=shutil.ignore_patterns("checkpoints", "model.pt"))
    path = write_sleuth(tmp_path / "s.txt", [("a", real_studies["MNI"]["xyz"])], "MNI")
    result = analyse_file(path, run, tiny_dataset).results[0]
    assert result.posterior is None and result.reconstruction is None and result.typicality is None
    assert result.conditional_mean is not None and result.conditional_mean.max() > 0
    assert any("exports no encoder" in w for w in result.warnings)


def test_cli_end_to_end(tmp_path: Path, tiny_runs: dict[str, Path], tiny_dataset: Path, real_studies: dict) -> None:
    path = write_sleuth(
        tmp_path / "s.txt",
        [("mni study", real_studies["MNI"]["xyz"]), ("small study", real_studies["MNI"]["xyz"][:5])],
        "MNI",
    )
    out = tmp_path / "out"
    cli = ["-m", "cbvae_ext.study", str(path), "--run_dir", str(tiny_runs["cbvae"]), "--out", str(out)]
    env = {**BUNDLE_ENV, "CBVAE_CACHE_DIR": str(tmp_path / "cache")}
    proc = run_python([*cli, "--dataset_dir", str(tiny_dataset), "--year", "2010"], env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    index = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in index["studies"]] == ["mni study", "small study"]
    assert list(tmp_path.glob(".out.partial-*")) == [] and list((tmp_path / "cache").glob("study/typicality-*.npz"))
    folder = out / index["studies"][0]["folder"]
    report = json.loads((folder / "report.json").read_text())
    assert report["format"] == "cbvae-study-report" and report["conditions"]["year"] == 2010.0
    assert 0 <= report["typicality"]["percentile"] <= 100 and report["nearest"][0]["id"] == real_studies["MNI"]["id"]
    for name, generated in (("ma_map", False), ("reconstruction", True), ("conditional_mean", True)):
        sidecar = json.loads((folder / f"{name}.json").read_text())
        img = nib.load(folder / f"{name}.nii.gz")
        assert sidecar["generated"] is generated and img.shape == tuple(report["grid"]["shape"])
        assert (b"GENERATED" in img.header["descrip"].tobytes()) is generated
        np.testing.assert_allclose(img.affine, np.asarray(report["grid"]["affine"]))
    assert "typicality percentile" in proc.stdout
    # bad input: one line on stderr, exit status 2, nothing written
    bad = tmp_path / "bad.txt"
    bad.write_text("// Reference=Colin27\n// a\n// Subjects=3\n1 2 3\n")
    proc = run_python([*cli[:2], str(bad), *cli[3:-1], str(tmp_path / "never")], env=env, timeout=600)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: ") and "unknown coordinate space" in proc.stderr
    assert not (tmp_path / "never").exists()
    # an existing folder that is not a study report is never replaced (in process: the CLI calls the same write)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    analysis = analyse_file(path, tiny_runs["cbvae"], tiny_dataset, readings=False)
    with pytest.raises(StudyError) as e:
        analysis.write(tmp_path / "mine")
    _one_line(e, "not an earlier study report", "choose another --out")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert (
        analysis.write(out) == out
        and json.loads((out / "report.json").read_text())["studies"][0]["name"] == "mni study"
    )


def test_a_studys_text_becomes_the_terms_condition(context: StudyContext) -> None:
    """A run with a terms group reads a study's text through NeuroQuery's terms, as the training studies' text."""
    model = context.model
    dims = model.schema.term_dims
    cond, notes = context.conditions({"text": "Pain and working memory in the insula"})
    assert cond["terms"].shape == (dims,) and np.isfinite(cond["terms"]).all()
    np.testing.assert_allclose(cond["terms"], model.text_terms("Pain and working memory in the insula"))
    assert "text: embedded through NeuroQuery's terms (the run's terms condition)" in notes
    assert not np.allclose(model.text_terms("pain"), model.text_terms("working memory"))
    cond, notes = context.conditions({"text": "xyzzy qwerty"})
    assert "terms" not in cond and "text: no NeuroQuery term recognised; terms left unknown" in notes
    assert model.text_terms("") is None
    # the terms change the conditional mean map
    with_terms = model.conditional_mean({"terms": model.text_terms("pain")}).map
    assert not np.allclose(with_terms, model.conditional_mean({}).map)
