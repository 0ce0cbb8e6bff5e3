"""The bundle's ``inference`` workflow (bundle/configs/inference.yaml) on the session's tiny runs."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import run_bundle, run_python

from cbvae_ext.app.downloads import GENERATED_DESCRIPTION
from cbvae_ext.generation import MapGenerator, sidecar_path
from cbvae_ext.inference import load

INFERENCE = ["-m", "monai.bundle", "run", "inference", "--config_file", "bundle/configs/inference.yaml"]


def test_the_bundle_writes_the_conditional_mean_for_the_conditions(tiny_runs: dict[str, Path], tmp_path: Path):
    run = tiny_runs["cbvae"]
    model = load(run)
    task = model.categories[0]
    out = tmp_path / "maps" / "wm.nii.gz"
    conditions = json.dumps({"task": task, "year": 2010})
    proc = run_bundle([*INFERENCE, "--run_dir", str(run), "--conditions", conditions, "--output_file", str(out)])
    assert f"wrote {out}" in proc.stdout
    img = nib.load(out)
    assert img.header["descrip"].tobytes().rstrip(b"\0").decode() == GENERATED_DESCRIPTION
    assert img.shape == model.grid_shape and np.allclose(img.affine, model.affine)
    expected = model.conditional_mean({"task": task, "year": 2010}).map
    np.testing.assert_allclose(img.get_fdata(), expected, atol=1e-6)
    # the conditions change the map (not a constant output)
    other = model.conditional_mean({"task": model.categories[-1], "year": 2010}).map
    assert np.abs(expected - other).max() > 1e-4
    sidecar = json.loads(sidecar_path(out).read_text())
    assert sidecar["generated"] is True and sidecar["nifti"] == "wm.nii.gz"
    assert sidecar["conditions"] == {"task": task, "year": 2010} and sidecar["run_dir"] == str(run)
    assert sidecar["what"].startswith("conditional mean") and "sample_size" in sidecar["defaulted"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["wm.json", "wm.nii.gz"]  # no temporaries left


def test_a_run_without_conditional_mean_or_a_given_z_decodes_z(tiny_runs: dict[str, Path], tmp_path: Path):
    model = load(tiny_runs["baseline"])
    assert not model.has_conditional_mean
    out = tmp_path / "base.nii"
    sidecar = MapGenerator(tiny_runs["baseline"], out, "{'year': 2000}").run()
    np.testing.assert_allclose(nib.load(out).get_fdata(), model.decode(np.zeros(model.latent_size)).map, atol=1e-6)
    assert sidecar["what"].endswith("(z = 0)") and sidecar["z"] is None
    cbvae = load(tiny_runs["cbvae"])
    z = [0.5] * cbvae.latent_size
    sidecar = MapGenerator(tiny_runs["cbvae"], tmp_path / "z.nii.gz", None, str(z)).run()
    expected = cbvae.decode(np.asarray(z), {}).map
    np.testing.assert_allclose(nib.load(tmp_path / "z.nii.gz").get_fdata(), expected, atol=1e-6)
    assert sidecar["z"] == z and sidecar_path(tmp_path / "z.nii.gz").name == "z.json"


def test_an_unknown_category_through_the_bundle_is_one_line(tiny_runs: dict[str, Path], tmp_path: Path):
    out = tmp_path / "x.nii.gz"
    args = [*INFERENCE, "--run_dir", str(tiny_runs["cbvae"]), "--conditions", "{'task': 'chess'}"]
    proc = run_python([*args, "--output_file", str(out)], timeout=600)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: unknown task category 'chess'; valid categories: ")
    assert "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"conditions": "{'year': 1200}"}, "error: condition 'year'=1200.0 is outside the schema range ["),
        ({"conditions": "[1, 2]"}, "error: --conditions must map condition names to values"),
        ({"conditions": "{task: x"}, "error: --conditions '{task: x' is not a literal"),
        ({"output_file": "out.png"}, "error: --output_file 'out.png' must end with .nii.gz or .nii"),
        ({"run_dir": None}, "error: --run_dir is required"),
        ({"z": "[0, 1]"}, "error: z has 2 values; the run's latent size is "),
        ({"allow_extrapolation": "maybe"}, "error: --allow_extrapolation must be true or false"),
    ],
)
def test_bad_options_are_one_line(tiny_runs: dict[str, Path], tmp_path: Path, capsys, options, message):
    given = {"run_dir": tiny_runs["cbvae"], "output_file": tmp_path / "x.nii.gz", **options}
    with pytest.raises(SystemExit) as exit_:
        MapGenerator(**given).run_cli()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
