"""Loading runs and checking options for evaluation: every bad input is a one-line ``EvaluationError``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cbvae_ext.errors import CbvaeError
from cbvae_ext.evaluation.workflow import Evaluation, EvaluationError, load_run
from cbvae_ext.networks import build_network, preset_config
from cbvae_ext.run_folder import RunFolderError
from cbvae_ext.schema import MetadataSchema

GRID = (12, 14, 12)


def _schema(categories: tuple[str, ...] = ("motor", "memory", "other")) -> MetadataSchema:
    years = np.linspace(1995, 2020, 40)
    return MetadataSchema.fit(list(categories), {"year": years, "sample_size": np.full(40, 20.0)})


def _make_run(root: Path, schema: MetadataSchema, grid=GRID, model: str = "cbvae", **overrides) -> Path:
    config = preset_config("cpu", schema, grid, model=model, **overrides)
    root.mkdir(parents=True, exist_ok=True)
    torch.save(build_network(config).state_dict(), root / "model.pt")
    (root / "network_config.json").write_text(json.dumps(config))
    decoder_schema = {
        "latent_size": config["latent_size"],
        "model": model,
        "meta_schema": schema.to_dict(),
        "grid": {"shape": list(grid), "affine": np.eye(4).tolist()},
    }
    (root / "decoder_schema.json").write_text(json.dumps(decoder_schema))
    return root


def test_load_run_restores_the_weights_in_eval_mode(tmp_path):
    schema = _schema()
    run_dir = _make_run(tmp_path / "run", schema)
    run = load_run(run_dir, schema, GRID)
    saved = torch.load(run_dir / "model.pt", weights_only=True)
    for key, value in run.model.state_dict().items():
        torch.testing.assert_close(value, saved[key])
    assert not run.model.training and run.kind == "cbvae" and run.latent_size == 32
    assert len(run.checkpoint_sha256) == 64


def test_grid_mismatch(tmp_path):
    schema = _schema()
    run_dir = _make_run(tmp_path / "run", schema)
    with pytest.raises(RunFolderError, match=r"grid mismatch.*\[12, 14, 12\].*\[16, 16, 16\]"):
        load_run(run_dir, schema, (16, 16, 16))


def test_schema_mismatch_meta_dim_and_categories(tmp_path):
    run_dir = _make_run(tmp_path / "run", _schema())
    with pytest.raises(RunFolderError, match="schema mismatch.*meta_dim=7.*meta_dim=8"):
        load_run(run_dir, _schema(("motor", "memory", "language", "other")), GRID)
    with pytest.raises(RunFolderError, match="schema mismatch.*categories"):
        load_run(run_dir, _schema(("motor", "emotion", "other")), GRID)


def test_latent_size_mismatch_with_decoder_schema(tmp_path):
    schema = _schema()
    run_dir = _make_run(tmp_path / "run", schema)
    spec = json.loads((run_dir / "decoder_schema.json").read_text())
    (run_dir / "decoder_schema.json").write_text(json.dumps({**spec, "latent_size": 16}))
    with pytest.raises(RunFolderError, match="latent_size.*16.*32|32.*16"):
        load_run(run_dir, schema, GRID)


def test_checkpoint_not_matching_its_config(tmp_path):
    schema = _schema()
    run_dir = _make_run(tmp_path / "run", schema)
    other = _make_run(tmp_path / "other", schema, latent_size=8)
    (run_dir / "model.pt").write_bytes((other / "model.pt").read_bytes())
    with pytest.raises(RunFolderError, match="model.pt") as err:
        load_run(run_dir, schema, GRID)
    assert "\n" not in str(err.value)


def test_missing_and_unsafe_checkpoints(tmp_path):
    schema = _schema()
    with pytest.raises(RunFolderError, match="does not exist"):
        load_run(tmp_path / "nowhere", schema, GRID)
    run_dir = _make_run(tmp_path / "run", schema)
    # a pickled object (not plain tensors) is refused by weights_only=True
    torch.save({"net": torch.nn.Linear(2, 2)}, run_dir / "model.pt")
    with pytest.raises(RunFolderError, match="weights_only=True"):
        load_run(run_dir, schema, GRID)
    (run_dir / "model.pt").unlink()
    with pytest.raises(RunFolderError, match="has no model.pt"):
        load_run(run_dir, schema, GRID)


def test_run_trained_on_another_dataset_build_is_refused(tmp_path):
    schema = _schema()
    run_dir = _make_run(tmp_path / "run", schema)
    config = json.loads((run_dir / "network_config.json").read_text())
    (run_dir / "network_config.json").write_text(json.dumps({**config, "dataset_manifest_sha256": "a" * 64}))
    assert load_run(run_dir, schema, GRID, manifest_sha256="a" * 64).kind == "cbvae"
    with pytest.raises(RunFolderError, match=r"dataset mismatch: .* was trained on .*aaaaaaaaaaaa.*bbbbbbbbbbbb"):
        load_run(run_dir, schema, GRID, manifest_sha256="b" * 64)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("n_bootstrap", 0, "--n_bootstrap 0 is invalid; give an integer >= 1"),
        ("n_permutations", -1, "--n_permutations -1 is invalid; give an integer >= 0"),
        ("batch_size", 0, "--batch_size 0 is invalid; give an integer >= 1"),
        ("iwae_k", 0, "--iwae_k 0 is invalid; give an integer >= 1"),
        ("n_prior_samples", 2.5, "--n_prior_samples 2.5 is invalid; give an integer >= 1"),
        ("joint_k", 0, "--joint_k 0 is invalid; give an integer >= 1"),
        ("generative_max_maps", 0, "--generative_max_maps 0 is invalid; give an integer >= 1"),
        ("qc_max_maps", "x", "--qc_max_maps 'x' is invalid; give an integer >= 1"),
        ("neuroquery", "maybe", "--neuroquery 'maybe' is invalid; give true or false"),
        ("qc_max_map", 8, "--qc_max_map is not an evaluation option; the options: batch_size, num_workers"),
    ],
)
def test_bad_numeric_options_are_one_line_errors(tmp_path, capsys, option, value, message):
    # before the fix these ran into the pipeline and ended in tracebacks (issue 9, evaluation/run.py:239, now workflow.py)
    evaluation = Evaluation(tmp_path / "data", tmp_path / "run", tmp_path / "eval", **{option: value})
    with pytest.raises(SystemExit) as exc:
        evaluation.run_cli()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}")


def test_output_dir_on_a_file_is_a_one_line_error(tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    with pytest.raises(SystemExit):
        Evaluation(tmp_path / "data", tmp_path / "run", target).run_cli()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --output_dir {target} is a file; give a folder (it is created if missing)"]
    assert target.read_text() == "keep me"


def test_evaluation_error_is_a_cbvae_error():
    assert issubclass(EvaluationError, CbvaeError) and issubclass(EvaluationError, ValueError)


def test_a_device_this_evaluation_cannot_use_is_one_line(tmp_path, capsys):
    for device, message in (
        ("tpu", "--device 'tpu' is not a device this evaluation runs on; give cpu or cuda"),
        ("meta", "--device 'meta' is not supported; give cpu or cuda"),
    ):
        with pytest.raises(SystemExit) as exc:
            Evaluation(tmp_path / "data", tmp_path / "run", tmp_path / "eval", device=device).run_cli()
        assert exc.value.code == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "eval").exists()


def test_a_folder_holding_other_files_is_not_replaced(tmp_path, capsys):
    target = tmp_path / "run_folder"
    target.mkdir()
    (target / "model.pt").write_bytes(b"weights")
    with pytest.raises(SystemExit):
        Evaluation(tmp_path / "data", tmp_path / "run", target).run_cli()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds 'model.pt', not an evaluation's file" in err[0]
    assert (target / "model.pt").read_bytes() == b"weights"


def test_the_folder_is_written_as_a_set(tmp_path):
    from cbvae_ext.evaluation.workflow import _folder_set

    out = tmp_path / "eval"
    out.mkdir()
    (out / "test_results.json").write_text('{"run": "old"}')
    (out / "per_map_test.parquet").write_bytes(b"old table")
    with pytest.raises(RuntimeError, match="late failure"), _folder_set(out) as tmp:
        (tmp / "per_map_test.parquet").write_bytes(b"new table")
        raise RuntimeError("late failure")
    # a failed run leaves the other run's folder whole and no partial folder behind
    assert (out / "per_map_test.parquet").read_bytes() == b"old table"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]
    with _folder_set(out) as tmp:
        (tmp / "test_results.json").write_text('{"run": "new"}')
    assert [p.name for p in out.iterdir()] == ["test_results.json"]  # the old table went with its run
    assert json.loads((out / "test_results.json").read_text()) == {"run": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]
    (tmp_path / "plain").mkdir()
    assert (out.stat().st_mode & 0o777) == ((tmp_path / "plain").stat().st_mode & 0o777)  # not mkdtemp's 0700


def test_json_safe_makes_nan_and_infinity_null():
    from cbvae_ext.evaluation.workflow import json_safe

    value = {"rho": float("nan"), "x": np.float32(np.inf), "a": np.array([1.0, np.nan]), "n": np.int64(3), "s": "ok"}
    text = json.dumps(json_safe(value), allow_nan=False)
    assert json.loads(text) == {"rho": None, "x": None, "a": [1.0, None], "n": 3, "s": "ok"}


#: evaluate.yaml's top-level keys that are not options: the folders, the device and MONAI's own.
_NOT_OPTIONS = {"imports", "evaluator", "evaluate", "device", "dataset_dir", "output_dir", "ood_dataset_dir"}


def test_one_declaration_of_the_evaluation_options() -> None:
    """evaluate.yaml's options are EvalOptions' fields with its defaults, and its evaluator passes each one
    (it once left out the decoding and QC options: --qc_max_maps was silently ignored)."""
    import dataclasses
    import inspect

    import yaml

    from cbvae_ext.evaluation.options import EvalOptions

    config = yaml.safe_load((Path(__file__).parents[1] / "bundle/configs/evaluate.yaml").read_text())
    fields = [f.name for f in dataclasses.fields(EvalOptions)]
    options = [k for k in config if k not in _NOT_OPTIONS and not k.endswith("run_dir")]
    assert options == fields
    assert {k: config[k] for k in fields} == dataclasses.asdict(EvalOptions())
    passed = {k: v for k, v in config["evaluator"].items() if k != "_target_"}
    assert passed == {k: f"@{k}" for k in config if k not in ("imports", "evaluator", "evaluate")}
    params = inspect.signature(Evaluation).parameters
    assert list(params)[-1] == "options" and not set(fields) & set(params)


def test_the_documented_option_table_is_generated() -> None:
    import re

    from cbvae_ext.evaluation.options import option_table

    doc = (Path(__file__).parents[1] / "bundle/docs/README.md").read_text()
    found = re.search(r"<!-- options:begin -->\n(.*?)\n<!-- options:end -->", doc, re.S)
    assert found, "bundle/docs/README.md lost its option table markers"
    assert found.group(1) == option_table(), "run `python -m cbvae_ext.evaluation.options` and paste its table"
