"""A run folder read by one reader: hostile copies of the tiny trained runs fail at load, in one line.

Every test copies a run of ``tiny_runs`` (trained once per session by the bundle CLI) into ``tmp_path``
and damages the copy; nothing is retrained here.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cbvae_ext.data import load_dataset_info, normalise_maps
from cbvae_ext.evaluation import report
from cbvae_ext.export import trace_decoder
from cbvae_ext.inference import InferenceError, NoConditionalMeanError, load
from cbvae_ext.networks import build_network
from cbvae_ext.run_folder import (
    COND_MEAN,
    DECODER,
    EVALUATION_FILES,
    SCHEMA,
    TERM_EMBEDDING,
    RunFolder,
    RunFolderError,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cbvae_copy(tiny_runs: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_runs["cbvae"], tmp_path / "cbvae"))


def _edit_schema(run: Path, **changes: Any) -> dict[str, Any]:
    spec = json.loads((run / SCHEMA).read_text())
    spec.update(changes)
    (run / SCHEMA).write_text(json.dumps(spec))
    return spec


def _refused(run: Path, match: str) -> RunFolderError:
    with pytest.raises(RunFolderError, match=match) as err:
        load(run)
    assert "\n" not in str(err.value)
    return err.value


# ----- the files checked against each other at load ---------------------------------------------------


def test_decoder_of_another_latent_size_is_refused_at_load(cbvae_copy: Path) -> None:
    config = json.loads((cbvae_copy / "network_config.json").read_text())
    other = build_network({**config, "latent_size": 16}).eval()
    cond_dim = config["meta_dim"] + config["mask_dim"]
    torch.jit.save(trace_decoder(other, cond_dim), str(cbvae_copy / DECODER))
    # before: load succeeded and the first decode raised torch's "mat1 and mat2 shapes cannot be multiplied"
    _refused(cbvae_copy, r"decoder.ts does not decode z \[1, 32\] and conditions \[1, \d+\].*keep decoder.ts and")


class _FakeDecoder(torch.nn.Module):
    """A TorchScript program with the decoder's signature that returns a constant map of any shape."""

    def __init__(self, shape: list[int], value: float) -> None:
        super().__init__()
        self.shape = shape
        self.value = value

    def forward(self, z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return torch.full([z.shape[0], 1] + self.shape, self.value)


@pytest.mark.parametrize(
    ("shape", "value", "message"),
    [
        (None, 1e6, r"decoder.ts gives values outside \[0, 1\] or NaN .*range 1e\+06\.\.1e\+06"),  # was accepted
        (None, math.nan, r"decoder.ts gives values outside \[0, 1\] or NaN"),  # was an InferenceError per decode
        ([4, 4, 4], 0.5, r"decoder.ts gives maps of shape \(1, 1, 4, 4, 4\), not \(1, 1, \d+, \d+, \d+\)"),
    ],
)
def test_decoder_output_is_probed_at_load(cbvae_copy: Path, shape: list[int] | None, value: float, message: str):
    grid = list(RunFolder.open(cbvae_copy).grid_shape)
    torch.jit.save(torch.jit.script(_FakeDecoder(shape or grid, value)), str(cbvae_copy / DECODER))
    _refused(cbvae_copy, message)


@pytest.mark.parametrize(
    "defaults",
    [
        [0.0, 0.0, 0.0, 0.0],  # the list form evaluation parsed; nothing writes it
        {"year": 0.0},  # fields missing
        {"year": "2005", "sample_size": 0.0, "field_strength": 0.0, "fwhm": 0.0},
        {"year": math.nan, "sample_size": 0.0, "field_strength": 0.0, "fwhm": 0.0},
        {"year": None, "sample_size": 0.0, "field_strength": 0.0, "fwhm": 0.0},  # was read as 0
        "zeros",
    ],
)
def test_imputed_defaults_of_the_wrong_type_are_refused_at_load(cbvae_copy: Path, defaults: Any) -> None:
    _edit_schema(cbvae_copy, imputed_defaults=defaults)
    err = _refused(cbvae_copy, r"decoder_schema.json: imputed_defaults must map each of year, sample_size, field_")
    assert "finite number" in str(err)


@pytest.mark.parametrize("edit", ["add", "rename"])
def test_a_changed_category_list_is_refused_at_load(cbvae_copy: Path, edit: str) -> None:
    spec = json.loads((cbvae_copy / SCHEMA).read_text())
    cats = spec["meta_schema"]["categories"]
    spec["meta_schema"]["categories"] = [*cats, "chess"] if edit == "add" else ["chess", *cats[1:]]
    (cbvae_copy / SCHEMA).write_text(json.dumps(spec))
    # before: "add" failed at the first decode inside the TorchScript program, "rename" decoded silently
    _refused(cbvae_copy, r"decoder_schema.json: meta_schema's categories or fields do not give its recorded")


def test_network_config_of_another_schema_is_refused(cbvae_copy: Path) -> None:
    config = json.loads((cbvae_copy / "network_config.json").read_text())
    (cbvae_copy / "network_config.json").write_text(json.dumps({**config, "meta_dim": config["meta_dim"] + 1}))
    with pytest.raises(RunFolderError, match=r"schema mismatch: .*network_config.json has meta_dim=\d+ but the"):
        RunFolder.open(cbvae_copy, require=EVALUATION_FILES)


def test_a_nan_affine_is_refused_at_load(cbvae_copy: Path) -> None:
    spec = json.loads((cbvae_copy / SCHEMA).read_text())
    spec["grid"]["affine"][0][0] = math.nan
    (cbvae_copy / SCHEMA).write_text(json.dumps(spec))
    _refused(cbvae_copy, r"decoder_schema.json: the grid affine is not finite and invertible")


@pytest.mark.parametrize("name", [SCHEMA, "network_config.json"])
def test_deeply_nested_json_is_a_run_folder_error(cbvae_copy: Path, name: str) -> None:
    depth = 200_000
    (cbvae_copy / name).write_text('{"a": ' + "[" * depth + "]" * depth + "}")
    _refused(cbvae_copy, rf"{name} is nested too deeply to be a run file")  # was RecursionError


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_conditional_mean_file_is_confined_to_the_run_folder(cbvae_copy: Path, where: str) -> None:
    outside = cbvae_copy.parent / "elsewhere"
    outside.mkdir()
    shutil.copy(cbvae_copy / COND_MEAN, outside / COND_MEAN)
    name = f"../elsewhere/{COND_MEAN}" if where == "parent" else str(outside / COND_MEAN)
    _edit_schema(cbvae_copy, conditional_mean_file=name)
    # before: load succeeded and conditional_mean() ran the program outside the folder
    _refused(cbvae_copy, r"decoder_schema.json: conditional_mean_file '.*' is not a file name inside the run folder")
    _edit_schema(cbvae_copy, conditional_mean_file=None, mask_file="../elsewhere/mask.nii.gz")
    _refused(cbvae_copy, r"mask_file '\.\./elsewhere/mask.nii.gz' is not a file name inside the run folder")


def test_a_damaged_conditional_mean_is_refused_at_load(cbvae_copy: Path) -> None:
    (cbvae_copy / COND_MEAN).write_bytes(b"not torchscript")
    _refused(cbvae_copy, r"conditional_mean.ts is not a TorchScript file")  # was at the first conditional_mean()
    (cbvae_copy / COND_MEAN).unlink()
    err = _refused(cbvae_copy, r"has no conditional_mean.ts although decoder_schema.json names it")
    assert err.missing == (COND_MEAN,)


def test_the_term_embedding_travels_with_the_run_and_a_bad_one_is_one_line(cbvae_copy: Path) -> None:
    run = RunFolder.open(cbvae_copy)
    embedder = run.term_embedder()
    assert embedder.embedding.dims == run.schema.term_dims > 0 and len(embedder.vocabulary) == 7547
    assert embedder.embed_terms(["pain"]).shape == (run.schema.term_dims,)
    with np.load(cbvae_copy / TERM_EMBEDDING) as z:
        arrays = dict(z)
    np.savez(
        cbvae_copy / TERM_EMBEDDING,
        **{**arrays, "components": arrays["components"][:, :2], "offset": arrays["offset"][:2]},
    )
    with pytest.raises(RunFolderError, match=r"embeds in 2 dimensions but the schema's terms group has \d+; re-export"):
        RunFolder.open(cbvae_copy).term_embedder()
    (cbvae_copy / TERM_EMBEDDING).write_bytes(b"junk")
    with pytest.raises(RunFolderError, match="term_embedding.npz is unreadable"):
        RunFolder.open(cbvae_copy).term_embedder()
    (cbvae_copy / TERM_EMBEDDING).unlink()
    with pytest.raises(RunFolderError, match="has no term_embedding.npz; re-export") as err:
        RunFolder.open(cbvae_copy).term_embedder()
    assert err.value.missing == (TERM_EMBEDDING,)


# ----- what the export writes and the one reader gives back -------------------------------------------


def test_export_records_the_imputation_heads_mean_and_readers_use_it(tiny_runs, tiny_dataset: Path) -> None:
    run = RunFolder.open(tiny_runs["cbvae"], require=EVALUATION_FILES)
    net, info = run.load_network(), load_dataset_info(tiny_dataset)
    rows = info.rows("train")
    with torch.no_grad():
        imp = net.impute(normalise_maps(info.maps[rows]).unsqueeze(1))[0].double().mean(dim=0).numpy()
    recorded = json.loads(run.file(SCHEMA).read_text())["imputed_defaults"]
    names = [f.name for f in run.schema.fields]
    np.testing.assert_allclose([recorded[n] for n in names], imp, atol=1e-5)
    assert np.abs(imp).max() > 1e-3  # the export wrote zeros before, whatever the model had learned
    np.testing.assert_allclose(run.imputed_default_vector, imp, atol=1e-5)
    assert run.imputed_default_vector.dtype == np.float32

    # inference fills a left-out field with it (mask 0) ...
    model = load(run.path)
    m, _, defaulted = model.conditioning({"task": run.schema.categories[0]})
    np.testing.assert_allclose(m[: len(names)], imp, atol=1e-5)
    assert m[run.schema.meta_dim : run.schema.meta_dim + len(names)].tolist() == [0.0] * len(names)
    assert defaulted["year"] == pytest.approx(float(run.schema.field("year").inverse(imp[0])), rel=1e-5)
    # ... and the app shows it in raw units, through the same accessor
    from cbvae_ext.app.session import load_run_info

    shown = load_run_info(run.path).imputed_defaults
    assert shown == pytest.approx(run.imputed_defaults_raw)
    assert shown["year"] == pytest.approx(float(run.schema.field("year").inverse(imp[0])), rel=1e-5)


def test_conditional_mean_only_where_the_run_has_the_path(tiny_runs) -> None:
    model = load(tiny_runs["cbvae"])
    assert model.has_conditional_mean and RunFolder.open(tiny_runs["cbvae"]).has_conditional_mean
    cats = model.categories
    a, b = (model.conditional_mean({"task": c}).map for c in cats[:2])
    assert a.shape == model.grid_shape and np.abs(a - b).max() > 1e-6

    baseline = load(tiny_runs["baseline"])
    spec = json.loads((tiny_runs["baseline"] / SCHEMA).read_text())
    assert spec["conditional_mean_file"] is None and not (tiny_runs["baseline"] / COND_MEAN).exists()
    assert not baseline.has_conditional_mean
    assert not hasattr(baseline, "conditional_mean")  # older callers probed this way; it still answers
    with pytest.raises(InferenceError, match=r"has no conditional-mean path; check model.has_conditional_mean"):
        baseline.conditional_mean({"task": cats[0]})
    with pytest.raises(NoConditionalMeanError):
        baseline.conditional_mean()
    with pytest.raises(RunFolderError, match="has no conditional-mean path"):
        RunFolder.open(tiny_runs["baseline"]).load_conditional_mean()


# ----- temporary files left by a kill -----------------------------------------------------------------

_KILLED_WRITE = """
import os, signal, sys
from cbvae_ext.run_folder import replace_atomically

def write(tmp):
    open(tmp, "wb").write(b"half")
    os.kill(os.getpid(), signal.SIGKILL)

replace_atomically(sys.argv[1], write)
"""


def test_a_killed_write_leaves_a_temporary_that_the_next_write_removes(cbvae_copy: Path) -> None:
    target = cbvae_copy / COND_MEAN
    before = target.read_bytes()
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITE, str(target)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stderr=subprocess.PIPE,
    )
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == -9, stderr.decode()[-2000:]
    left = sorted(cbvae_copy.glob(f".{COND_MEAN}.*.tmp"))
    assert [p.name.split(".")[-2].split("-")[0] for p in left] == [str(proc.pid)]
    assert target.read_bytes() == before  # the old file, never half a new one
    # a live writer's temporary is left alone
    live = cbvae_copy / f".{COND_MEAN}.{os.getpid()}-0123abcd.tmp"
    live.write_bytes(b"in progress")

    from cbvae_ext.run_folder import replace_atomically

    replace_atomically(target, lambda tmp: Path(tmp).write_bytes(before))
    assert sorted(cbvae_copy.glob(f".{COND_MEAN}.*.tmp")) == [live]  # was: the killed writer's file stayed
    assert target.read_bytes() == before and load(cbvae_copy).has_conditional_mean


# ----- python -m cbvae_ext.evaluation.report ----------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"does not exist; rerun the evaluation"),
        ('{"layout": "cbvae-test-results", "layout_vers', r"is not complete JSON"),
        ("[1, 2]", r"holds a JSON list, not a test_results.json object"),
        ('{"layout": "cbvae-test-results", "layout_version": 99}', r"version 99 but this cbvae_ext reads"),
        ('{"n_test": 3}', r"has layout None version None"),
        ('{"layout": "cbvae-test-results", "layout_version": 2, "models": [1]}', r"does not have the test_results"),
    ],
)
def test_report_gives_one_line_on_bad_results(tmp_path: Path, capsys, content: str | None, message: str) -> None:
    path = tmp_path / "test_results.json"
    if content is not None:
        path.write_text(content)
    assert report.main([str(path if content is None else tmp_path)]) == 2  # a folder names its file
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err), err
