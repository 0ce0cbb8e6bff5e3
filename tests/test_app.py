"""The Counterfactual Machine app: its logic (paths, ranges, rendering) and the page itself via AppTest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from cbvae_ext import app_logic as al
from cbvae_ext.schema import MetadataSchema, SchemaError

APP = Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py"


@pytest.fixture(scope="module")
def app_run(tiny_runs: dict[str, Path]) -> Path:
    """The C-β-VAE run trained by the bundle command on the tiny dataset."""
    return tiny_runs["cbvae"]


def _schema() -> MetadataSchema:
    return MetadataSchema.fit(["other", "working_memory"], {"year": np.array([2000.0, 2004.0, 2012.0])})


# ----- logic ----------------------------------------------------------------------------------------


def test_resolve_paths_order_cli_env_default(tmp_path: Path) -> None:
    root = tmp_path
    assert al.resolve_paths([], {}, root) == (root / "runs" / "cbvae", None)
    assert al.resolve_paths([], {"CBVAE_RUN_DIR": "r", "CBVAE_DATASET_DIR": "/d"}, root) == (root / "r", Path("/d"))
    argv = ["-x", "--run_dir", "/abs/run", "--dataset_dir=data"]
    assert al.resolve_paths(argv, {"CBVAE_RUN_DIR": "r"}, root) == (Path("/abs/run"), root / "data")


def test_slider_ranges_and_extrapolation_flags() -> None:
    schema = _schema()
    lo, hi, step = al.slider_spec(schema, "year")
    assert (lo, hi, step) == (1990, 2026, 1) and isinstance(lo, int)
    assert al.extrapolation_note(schema, "year", 2004.0) is None
    assert "[2000, 2012]" in al.extrapolation_note(schema, "year", 2020.0)
    assert al.extrapolation_note(schema, "year", None) is None
    # never observed in training: any value is an extrapolation
    assert "never observed" in al.extrapolation_note(schema, "fwhm", 8.0)
    assert al.slider_spec(schema, "fwhm") == (0.0, 20.0, 0.5)
    assert al.slider_value(schema, "fwhm", 7.3) == 7.5 and al.slider_value(schema, "year", 1950) == 1990
    assert al.sweep_years(schema) == [2000, 2002, 2005, 2007, 2010, 2012]


def test_filter_studies_and_study_start(tmp_path: Path) -> None:
    schema = _schema()
    latents = pd.DataFrame(
        {
            "id": ["a", "b", "c"],
            "title": ["Working memory load", None, "Memory and attention"],
            "year": [2003.0, np.nan, 2010.0],
            "category": ["working_memory", None, "unknown_category"],
            "split": ["train", "val", "test"],
        }
    )
    assert al.filter_studies(latents, "MEMORY")["id"].tolist() == ["a", "c"]
    assert al.filter_studies(latents, "", "working_memory")["id"].tolist() == ["a"]
    assert al.filter_studies(latents, "memory", None, "test")["id"].tolist() == ["c"]
    mu = np.array([[0.5, -9.0], [0.0, 0.0], [1.0, 1.0]], dtype=np.float32)
    info = al.RunInfo(
        tmp_path,
        schema,
        2,
        np.array([1, 0]),
        np.array([0.1, 0.2]),
        {},
        latents,
        mu,
        np.ones((2, 2, 2), bool),
        np.eye(4),
    )
    start = al.study_start(info, "a")
    assert start.conditions == {
        "task": "working_memory",
        "year": 2003.0,
        "sample_size": None,
        "field_strength": None,
        "fwhm": None,
    }
    np.testing.assert_allclose(start.z, [0.5, -6.0])  # clipped into the slider range
    missing = al.study_start(info, "b")
    assert missing.conditions["task"] is None and missing.conditions["year"] is None
    assert al.study_start(info, "c").conditions["task"] is None  # a category the schema does not know
    meta = pd.DataFrame(
        {"id": ["a"], "sample_size": [24.0], "sample_size_observed": [True], "fwhm": [np.nan], "fwhm_observed": [False]}
    )
    assert al.study_start(info, "a", meta).conditions["sample_size"] == 24
    prior = al.prior_start(info, 3)
    np.testing.assert_allclose(prior.z, al.prior_start(info, 3).z)
    assert prior.key == "prior:3" and all(v is None for v in prior.conditions.values())


def test_renderer_puts_a_blob_where_mni_says() -> None:
    # 4 mm grid with the x axis flipped (as in FSL's templates): rendering must still be RAS/neurological
    affine = np.array([[-4.0, 0, 0, 90], [0, 4, 0, -126], [0, 0, 4, -72], [0, 0, 0, 1]])
    shape = (46, 55, 46)
    renderer = al.SliceRenderer(affine, shape, panel_px=110)
    volume = np.zeros(shape, np.float32)
    ijk = np.rint(np.linalg.solve(affine, [42.0, 18.0, 32.0, 1.0])[:3]).astype(int)
    volume[tuple(ijk)] = 1.0  # a right, anterior, superior voxel
    assert renderer.peak_mm(volume) == (42.0, 18.0, 32.0)
    tile = renderer.axial(volume, 32.0, cmap="autumn", vmax=1.0, threshold=0.5)  # yellow: no blue
    assert tile.shape == (55 * 2, 46 * 2, 3)
    hot = np.argwhere((tile[..., 0] > 200) & (tile[..., 2] < 50))
    assert len(hot) == 4  # one voxel, upsampled 2x2
    row, col = hot.mean(axis=0)
    assert col > tile.shape[1] / 2  # right hemisphere on the right
    assert row < tile.shape[0] / 2  # anterior at the top
    ortho = renderer.ortho(volume, (42.0, 18.0, 32.0), vmax=1.0, threshold=0.5)
    assert ortho.dtype == np.uint8 and ortho.shape[0] > 100
    assert renderer.bounds_mm()[0] == (-90.0, 90.0)


def test_load_run_info_reports_mismatches(tmp_path: Path) -> None:
    with pytest.raises(al.NoRunError, match="python -m monai.bundle run training"):
        al.load_run_info(tmp_path / "nothing")
    run = tmp_path / "run"
    run.mkdir()
    for name in al.RUN_FILES:
        (run / name).write_text("")
    (run / "decoder_schema.json").write_text(json.dumps({"latent_size": 2}))
    with pytest.raises(SchemaError, match="lacks field 'meta_schema'"):
        al.load_run_info(run)
    spec = {"latent_size": 2, "meta_schema": _schema().to_dict(), "grid": {"shape": [2, 2, 2]}, "latent_kl": [1.0]}
    (run / "decoder_schema.json").write_text(json.dumps(spec))
    with pytest.raises(SchemaError, match="latents.parquet is unreadable"):
        al.load_run_info(run)
    latents = {"id": ["a"], "title": ["t"], "year": [2001.0], "category": ["other"], "split": ["train"]}
    pd.DataFrame({**latents, "mu": [[0.1, 0.2, 0.3]]}).to_parquet(run / "latents.parquet")
    with pytest.raises(SchemaError, match="mu has 3 entries per study but latent_size is 2"):
        al.load_run_info(run)
    pd.DataFrame({**latents, "mu": [[0.1, -2.0]]}).to_parquet(run / "latents.parquet")
    with pytest.raises(SchemaError, match="latent_kl has 1 entries but latent_size is 2"):
        al.load_run_info(run)
    nib.save(nib.Nifti1Image(np.ones((2, 2, 2), np.uint8), np.eye(4)), run / "mask.nii.gz")
    spec["latent_kl"] = None  # not recorded: ranked by the posterior means' KL
    (run / "decoder_schema.json").write_text(json.dumps(spec))
    info = al.load_run_info(run)
    assert info.kl_order.tolist() == [1, 0] and info.imputed_defaults["year"] == pytest.approx(
        np.mean([2000, 2004, 2012])
    )


# ----- the page -------------------------------------------------------------------------------------


def _app(monkeypatch: pytest.MonkeyPatch, run_dir: Path, dataset_dir: Path | None = None):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("CBVAE_RUN_DIR", str(run_dir))
    if dataset_dir is not None:
        monkeypatch.setenv("CBVAE_DATASET_DIR", str(dataset_dir))
    else:
        monkeypatch.delenv("CBVAE_DATASET_DIR", raising=False)
    at = AppTest.from_file(str(APP), default_timeout=180)
    at.run()
    assert not at.exception, at.exception
    return at


def test_app_without_run_shows_the_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    at = _app(monkeypatch, tmp_path / "missing")
    assert not at.error
    text = at.warning[0].value
    assert "No trained run found" in text and "python -m monai.bundle run training" in text
    assert str(tmp_path / "missing") in text


def test_app_reports_schema_mismatch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, app_run: Path) -> None:
    run = tmp_path / "bad"
    shutil.copytree(app_run, run)
    spec = json.loads((run / "decoder_schema.json").read_text())
    spec["meta_schema"]["continuous_fields"] = spec["meta_schema"]["continuous_fields"][:2]
    (run / "decoder_schema.json").write_text(json.dumps(spec))
    at = _app(monkeypatch, run)
    assert len(at.error) == 1 and "does not match this app" in at.error[0].value
    assert "differ from" in at.error[0].value


def test_app_counterfactuals(monkeypatch: pytest.MonkeyPatch, app_run: Path, tiny_dataset: Path) -> None:
    at = _app(monkeypatch, app_run, tiny_dataset)
    assert not at.error, [e.value for e in at.error]
    assert [h.value for h in at.subheader] == ["Conditions", "Generated map", "Counterfactual difference", "Year sweep"]
    generated, real, difference, sweep = at.image
    first_difference = difference.value
    info = al.load_run_info(app_run)
    # the year sweep: six maps over the training years, one caption each
    assert sweep.captions == [str(y) for y in al.sweep_years(info.schema)]
    assert len(set(sweep.value)) >= 2  # the years do not all render the same picture
    assert "decode" in at.caption[-1].value and "ms" in at.caption[-1].value

    # a different task changes the generated map and therefore both pictures
    categories = info.schema.categories
    at.selectbox(key="task").set_value(categories[0]).run()
    before = (at.image[0].value, at.image[2].value)
    at.selectbox(key="task").set_value(categories[-1]).run()
    assert not at.exception and not at.error
    assert at.image[0].value != before[0] and at.image[2].value != before[1]

    # beyond the training range: flagged, still rendered
    at.checkbox(key="year_unknown").uncheck().run()
    at.slider(key="year_value").set_value(al.slider_spec(info.schema, "year")[1]).run()
    assert any("extrapolation" in w.value for w in at.warning)
    assert "extrapolating" in at.caption[-1].value and len(at.image) == 4

    # latent reset returns to the starting point: the difference map is zero again
    at.slider(key=f"z{int(info.kl_order[0])}").set_value(3.0).run()
    moved = at.image[2].value
    at.button(key="reset_latents").click().run()
    at.button(key="reset_conditions").click().run()
    assert at.image[2].value != moved and at.image[2].value == first_difference

    # a prior draw has no real map but renders every view
    at.radio(key="mode").set_value("Prior sample").run()
    assert not at.exception and not at.error and len(at.image) == 3
    assert any("prior draw has no real map" in i.value for i in at.info)
