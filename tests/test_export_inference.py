"""Export (TorchScript decoder, schema, latents) and the inference wrapper, on runs exported into tmp_path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from cbvae_ext.data import DatasetInfo, normalise_maps
from cbvae_ext.export import DecoderModule, export_decoder, latent_kl, write_latents
from cbvae_ext.inference import InferenceError, RunFolderError, load
from cbvae_ext.networks import FiLMGenerator, build_network, preset_config
from cbvae_ext.run_folder import APP_FILES, EVALUATION_FILES, RunFolder
from cbvae_ext.schema import MetadataSchema, SchemaError

matplotlib.use("Agg")

GRID = [24, 28, 24]
AFFINE = np.array([[4.0, 0, 0, -46], [0, 4.0, 0, -56], [0, 0, 4.0, -46], [0, 0, 0, 1]])
CATS = ["working memory", "emotion", "other"]


@pytest.fixture(scope="module")
def schema() -> MetadataSchema:
    rng = np.random.default_rng(0)
    return MetadataSchema.fit(
        CATS, {"year": rng.uniform(1995, 2015, 100), "sample_size": rng.integers(8, 60, 100) * 1.0}
    )


def _mask() -> np.ndarray:
    idx = np.indices(GRID).astype(float)
    centre = (np.array(GRID, dtype=float) - 1) / 2
    return (((idx - centre[:, None, None, None]) / (centre[:, None, None, None] * 0.9)) ** 2).sum(0) <= 1


def _export(root: Path, schema: MetadataSchema, model: str) -> tuple[Path, torch.nn.Module]:
    """Random-weight network with trained-like BN statistics and FiLM, saved and exported like a run."""
    torch.manual_seed(0)
    config = preset_config("cpu", schema, GRID, model)
    net = build_network(config)
    for module in net.modules():
        if isinstance(module, FiLMGenerator):
            torch.nn.init.normal_(module.mlp[-1].weight, std=0.5)
    with torch.no_grad():
        net(torch.rand(4, 1, *GRID), torch.zeros(4, schema.meta_dim), torch.ones(4, schema.mask_dim))
    net.eval()
    run = root / model
    run.mkdir(parents=True)
    (run / "network_config.json").write_text(json.dumps({**config, "manifest_sha256": "0" * 64}))
    torch.save(net.state_dict(), run / "model.pt")
    nib.save(nib.Nifti1Image(_mask().astype(np.uint8), AFFINE), root / "mask.nii.gz")
    export_decoder(net, schema, GRID, AFFINE, root / "mask.nii.gz", run, latent_kl=np.arange(32.0))
    return run, net


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, schema: MetadataSchema) -> tuple[Path, torch.nn.Module]:
    return _export(tmp_path_factory.mktemp("runs"), schema, "cbvae")


def test_run_files_and_schema(run: tuple[Path, torch.nn.Module], schema: MetadataSchema) -> None:
    path, _ = run
    info = json.loads((path / "decoder_schema.json").read_text())
    assert info["latent_size"] == 32 and info["model"] == "cbvae"
    assert info["grid"]["shape"] == GRID and np.allclose(info["grid"]["affine"], AFFINE)
    assert info["decoder_input_layout"][0] == "year_z" and info["decoder_input_layout"][-1] == "category_observed"
    assert len(info["decoder_input_layout"]) == schema.meta_dim + schema.mask_dim
    assert info["latent_kl"] == list(np.arange(32.0)) and info["mask_file"] == "mask.nii.gz"
    assert MetadataSchema.from_dict(info["meta_schema"]).categories == CATS
    assert (path / "mask.nii.gz").is_file()


def test_torchscript_equals_eager(run: tuple[Path, torch.nn.Module], schema: MetadataSchema) -> None:
    path, net = run
    decoder = torch.jit.load(str(path / "decoder.ts"))
    torch.manual_seed(1)
    z, m = torch.randn(3, 32), torch.randn(3, schema.meta_dim + schema.mask_dim)  # batch 3, traced at 1
    with torch.no_grad():
        eager = DecoderModule(net)(z, m)
        scripted = decoder(z, m)
    assert scripted.shape == (3, 1, *GRID)
    torch.testing.assert_close(scripted, eager, atol=1e-5, rtol=0)
    assert eager.std() > 1e-3  # a non-trivial output


def test_decode_conditions_and_reports(run: tuple[Path, torch.nn.Module], schema: MetadataSchema) -> None:
    model = load(run[0])
    z = np.random.default_rng(0).normal(size=32)
    res = model.decode(z, {"task": "working memory", "year": 2005})
    assert res.map.shape == tuple(GRID) and res.map.dtype == np.float32
    assert 0 <= res.map.min() and res.map.max() <= 1 and np.all(res.map[~model.mask] == 0)
    assert set(res.defaulted) == {"sample_size", "field_strength", "fwhm"} and res.imputed == {}
    assert res.defaulted["field_strength"] == pytest.approx(3.0)  # the documented prior centre
    m, _, _ = model.conditioning({"task": "working memory", "year": 2005})
    with torch.no_grad():
        direct = model.decoder(torch.tensor(z[None], dtype=torch.float32), torch.from_numpy(m[None]))[0, 0].numpy()
    np.testing.assert_allclose(res.map, np.where(model.mask, direct, 0), atol=1e-6)
    other = model.decode(z, {"task": "emotion", "year": 2005})
    assert np.abs(other.map - res.map).max() > 1e-4
    filled = model.decode(z, {"task": "emotion"}, imputed={"year": 2001.0, "sample_size": 30.0})
    assert filled.imputed == {"year": 2001.0, "sample_size": 30.0}
    assert set(filled.defaulted) == {"field_strength", "fwhm"}
    m, _, _ = model.conditioning({"task": "emotion"}, imputed={"year": 2001.0})
    assert m[0] == pytest.approx(schema.field("year").forward(2001.0)) and m[schema.meta_dim] == 0  # value, mask 0
    img = res.to_nifti()
    assert img.shape == tuple(GRID) and np.allclose(img.affine, AFFINE)
    from nilearn import plotting

    plotting.plot_stat_map(img, display_mode="z", cut_coords=1, bg_img=None).close()


def test_decode_many_year_sweep(run: tuple[Path, torch.nn.Module]) -> None:
    model = load(run[0])
    z = np.random.default_rng(1).normal(size=32)
    sweep = [{"task": "emotion", "year": y} for y in (1996, 2004, 2012)]
    many = model.decode_many(z, sweep)
    assert [r.conditions["year"] for r in many] == [1996, 2004, 2012]
    for r, c in zip(many, sweep, strict=True):
        np.testing.assert_allclose(r.map, model.decode(z, c).map, atol=1e-5)
    assert np.abs(many[0].map - many[2].map).max() > 1e-5
    with pytest.raises(ValueError, match="z has 2 rows for 3 condition sets"):
        model.decode_many(np.zeros((2, 32)), sweep)


def test_invalid_conditions(run: tuple[Path, torch.nn.Module], schema: MetadataSchema) -> None:
    model = load(run[0])
    z = np.zeros(32)
    with pytest.raises(
        SchemaError, match="unknown task category 'chess'; valid categories: working memory, emotion, other"
    ):
        model.decode(z, {"task": "chess"})
    high = schema.field("year").high
    with pytest.raises(SchemaError, match="'year'=2090.0 is outside the schema range .*allow_extrapolation=True"):
        model.decode(z, {"task": "emotion", "year": 2090})
    assert model.decode(z, {"task": "emotion", "year": 2090}, allow_extrapolation=True).map.shape == tuple(GRID)
    assert high < 2090
    with pytest.raises(SchemaError, match="'sample_size' must be non-negative"):
        model.decode(z, {"sample_size": -3}, allow_extrapolation=True)
    with pytest.raises(SchemaError, match="unknown condition 'colour'"):
        model.decode(z, {"colour": "red"})


def test_encode_matches_network(run: tuple[Path, torch.nn.Module], schema: MetadataSchema) -> None:
    path, net = run
    model = load(path)
    raw = np.random.default_rng(2).random(GRID).astype(np.float32) * 0.03
    mu, logvar = model.encode(raw, {"task": "emotion", "year": 2003})
    meta, mask = schema.encode_conditions({"task": "emotion", "year": 2003})
    with torch.no_grad():
        ref_mu, ref_logvar = net.encode(
            normalise_maps(raw[None]).unsqueeze(1), torch.from_numpy(meta[None]), torch.from_numpy(mask[None])
        )
    np.testing.assert_allclose(mu, ref_mu[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(logvar, ref_logvar[0].numpy(), atol=1e-5)
    mu2, _, imputed = model.encode(raw / raw.max(), {"task": "emotion", "year": 2003}, return_imputed=True)
    np.testing.assert_allclose(mu2, mu, atol=1e-5)  # raw or normalised input agree
    assert set(imputed) == {"year", "sample_size", "field_strength", "fwhm"}
    assert imputed["sample_size"] > 0  # log1p inverse of a prediction
    with pytest.raises(ValueError, match=r"map shape \(2, 2, 2\) differs from the run's grid"):
        model.encode(np.ones((2, 2, 2)))


def test_baseline_decoder_ignores_conditions(tmp_path: Path, schema: MetadataSchema) -> None:
    path, _ = _export(tmp_path, schema, "baseline")
    model = load(path)
    assert model.info["model"] == "baseline"
    z = np.random.default_rng(3).normal(size=32)
    a, b = model.decode(z, {"task": "emotion", "year": 2000}), model.decode(z, {"task": "other"})
    np.testing.assert_array_equal(a.map, b.map)
    assert model.encode(np.random.default_rng(0).random(GRID), return_imputed=True)[2] == {}


def test_missing_and_mismatched_run_files(run: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    with pytest.raises(RunFolderError, match=r"has no decoder.ts, decoder_schema.json, mask.nii.gz; train and export"):
        load(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(run[0], copy)
    shutil.copy(run[0].parent / "mask.nii.gz", copy / "mask.nii.gz")
    (copy / "model.pt").unlink()
    model = load(copy)  # decoding needs no checkpoint
    with pytest.raises(RunFolderError, match="has no model.pt"):
        model.encode(np.ones(GRID))
    config = json.loads((copy / "network_config.json").read_text())
    torch.save(build_network({**config, "bottleneck_channels": 4}).state_dict(), copy / "model.pt")
    with pytest.raises(RunFolderError, match="model.pt does not fit .*network_config.json"):
        load(copy).encode(np.ones(GRID))
    (copy / "decoder_schema.json").write_text("{}")
    with pytest.raises(RunFolderError, match="decoder_schema.json lacks latent_size, model, meta_schema, grid"):
        load(copy)


def test_write_latents(run: tuple[Path, torch.nn.Module], schema: MetadataSchema, tmp_path: Path) -> None:
    _, net = run
    n = 5
    rng = np.random.default_rng(4)
    maps = (rng.random((n, *GRID)) * 0.02).astype(np.float16)
    metadata = pd.DataFrame(
        {
            "id": [f"neurosynth:{i}" for i in range(n)],
            "title": [f"study {i}" for i in range(n)],
            "year": [2001.0, np.nan, 2010.0, 2004.0, 1999.0],
            "sample_size": [20.0, 12.0, np.nan, 40.0, 16.0],
            "field_strength": np.nan,
            "fwhm": np.nan,
            "category": ["emotion", None, "other", "working memory", "emotion"],
            "split": ["train", "train", "val", "test", "train"],
        }
    )
    info = DatasetInfo(tmp_path, {}, schema, metadata, maps, _mask(), AFFINE)
    net.train()
    kl = write_latents(net, info, tmp_path, "cpu", batch_size=2)
    assert net.training  # mode restored
    table = pd.read_parquet(tmp_path / "latents.parquet")
    assert list(table.columns) == ["id", "title", "year", "category", "split", "mu"]
    assert table["id"].tolist() == metadata["id"].tolist() and np.isnan(table["year"][1])
    mu = np.stack(table["mu"].to_numpy())
    meta, mask = info.encode(np.arange(n))
    net.eval()
    with torch.no_grad():
        ref_mu, ref_logvar = net.encode(
            normalise_maps(maps).unsqueeze(1), torch.from_numpy(meta), torch.from_numpy(mask)
        )
    np.testing.assert_allclose(mu, ref_mu.numpy(), atol=1e-5)
    train = [0, 1, 4]
    np.testing.assert_allclose(kl, latent_kl(ref_mu.numpy()[train], ref_logvar.numpy()[train]), rtol=1e-4)
    assert kl.shape == (32,) and (kl >= 0).all()


def _copy_run(run: tuple[Path, torch.nn.Module], dest: Path) -> Path:
    shutil.copytree(run[0], dest)
    shutil.copy(run[0].parent / "mask.nii.gz", dest / "mask.nii.gz")
    return dest


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("mask.nii.gz", b"not a nifti", r"mask.nii.gz is not a readable NIfTI mask"),  # was nibabel's ImageFileError
        ("decoder.ts", b"", r"decoder.ts is not a TorchScript file"),
        ("decoder_schema.json", b"[1, 2]", r"decoder_schema.json holds a list, not a JSON object"),  # was TypeError
        ("decoder_schema.json", b"\xff\xfe", r"decoder_schema.json is not readable JSON"),  # was UnicodeDecodeError
    ],
)
def test_load_damaged_file_is_a_run_folder_error(run, tmp_path: Path, name: str, content: bytes, message: str) -> None:
    copy = _copy_run(run, tmp_path / "copy")
    (copy / name).write_bytes(content)
    with pytest.raises(RunFolderError, match=message) as err:
        load(copy)
    assert "\n" not in str(err.value)


def test_encode_with_damaged_checkpoint_is_a_run_folder_error(run, tmp_path: Path) -> None:
    copy = _copy_run(run, tmp_path / "copy")
    (copy / "model.pt").write_bytes(b"\x80\x02garbage")  # was _pickle.UnpicklingError
    with pytest.raises(RunFolderError, match=r"model.pt cannot be loaded with weights_only=True"):
        load(copy).encode(np.ones(GRID))


def test_load_refuses_config_that_disagrees_with_decoder_schema(run, tmp_path: Path) -> None:
    copy = _copy_run(run, tmp_path / "copy")
    config = json.loads((copy / "network_config.json").read_text())
    (copy / "network_config.json").write_text(json.dumps({**config, "latent_size": 16}))
    with pytest.raises(
        RunFolderError,
        match=r"latent size mismatch: .*decoder_schema.json has latent_size 32 but network_config.json has 16",
    ):
        load(copy)


def test_decode_refuses_non_finite_latents_and_overflowing_conditions(run) -> None:
    model = load(run[0])
    z = np.zeros(32)
    z[3] = np.nan
    with pytest.raises(InferenceError, match="z holds NaN or infinite values"):  # was an all-NaN map
        model.decode(z, {"task": "emotion"})
    with pytest.raises(InferenceError, match="decoding gave NaN/infinite values"):
        model.decode(np.zeros(32), {"task": "emotion", "year": 1e300}, allow_extrapolation=True)
    assert np.isfinite(
        model.decode(np.zeros(32), {"task": "emotion", "year": 2030}, allow_extrapolation=True).map
    ).all()


def test_run_folder_offers_what_evaluation_and_the_app_read(run, schema: MetadataSchema, tmp_path: Path) -> None:
    path, net = run
    folder = RunFolder.open(path, require=EVALUATION_FILES)
    assert folder.latent_size == 32 and folder.model_kind == "cbvae" and folder.grid_shape == tuple(GRID)
    assert folder.trained_on == "0" * 64 and folder.schema.categories == CATS
    assert folder.imputed_defaults == {f.name: 0.0 for f in schema.fields}
    np.testing.assert_array_equal(folder.latent_kl, np.arange(32.0))
    loaded = folder.load_network()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values(), strict=True))
    folder.check_dataset(schema, GRID, "0" * 64)
    with pytest.raises(RunFolderError, match=r"dataset mismatch: .* manifest.json has sha256 000000000000…"):
        folder.check_dataset(schema, GRID, "1" * 64)
    with pytest.raises(RunFolderError, match=r"grid mismatch: .* has grid \[24, 28, 24\] but the dataset has"):
        folder.check_dataset(schema, [24, 28, 20])
    other = MetadataSchema.fit(["motor", "emotion", "other"], {"year": np.arange(1995.0, 2015.0)})
    with pytest.raises(RunFolderError, match="schema mismatch"):
        folder.check_dataset(other, GRID)

    # the app needs latents.parquet too; `missing` lets it show how to make the run
    copy = _copy_run(run, tmp_path / "copy")
    with pytest.raises(RunFolderError, match="has no latents.parquet") as err:
        RunFolder.open(copy, require=APP_FILES)
    assert err.value.missing == ("latents.parquet",)
    frame = pd.DataFrame({"id": ["a"], "title": ["t"], "year": [2000.0], "category": ["other"], "split": ["train"]})
    frame.assign(mu=[[0.0] * 31]).to_parquet(copy / "latents.parquet")
    with pytest.raises(RunFolderError, match="mu has 31 entries per study but latent_size is 32"):
        RunFolder.open(copy, require=APP_FILES).latents()
    frame.assign(mu=[[0.5] * 32]).to_parquet(copy / "latents.parquet")
    table, mu = RunFolder.open(copy, require=APP_FILES).latents()
    assert "mu" not in table and mu.shape == (1, 32) and mu.dtype == np.float32


def test_export_records_imputed_defaults_and_the_conditional_mean_path(run, schema: MetadataSchema, tmp_path: Path):
    path, net = run
    copy = _copy_run(run, tmp_path / "copy")
    defaults = {"year": 0.25, "sample_size": -0.5, "field_strength": 1.5, "fwhm": -2.0}
    export_decoder(net, schema, GRID, AFFINE, copy / "mask.nii.gz", copy, imputed=defaults)
    folder = RunFolder.open(copy)
    assert folder.imputed_defaults == defaults and folder.has_conditional_mean  # was zeros whatever was given
    model = load(copy)
    m, _, defaulted = model.conditioning({"task": "emotion"})
    np.testing.assert_allclose(m[:4], [0.25, -0.5, 1.5, -2.0])
    assert defaulted["year"] == pytest.approx(float(schema.field("year").inverse(0.25)))
    with pytest.raises(ValueError, match="do not give a finite value for every field"):
        export_decoder(net, schema, GRID, AFFINE, copy / "mask.nii.gz", copy, imputed={"year": 0.0})

    # a network without the path: the earlier export's conditional_mean.ts goes, the schema says null
    config = json.loads((path / "network_config.json").read_text())
    plain = build_network({**config, "cond_mean": False}).eval()
    export_decoder(plain, schema, GRID, AFFINE, copy / "mask.nii.gz", copy)
    assert not (copy / "conditional_mean.ts").exists()
    assert json.loads((copy / "decoder_schema.json").read_text())["conditional_mean_file"] is None
    assert not load(copy).has_conditional_mean and not RunFolder.open(copy).has_conditional_mean
    with pytest.raises(InferenceError, match="has no conditional-mean path"):
        load(copy).conditional_mean({"task": "emotion"})
