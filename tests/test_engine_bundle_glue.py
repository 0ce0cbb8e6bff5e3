"""Bundle glue and the training knobs: text switches, the knob checks (one-line errors, also through the real bundle
CLI), the logged hyper-parameters, the documented knob table, and the presets read from the bundle configs."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, run_python

from cbvae_ext.engine.bundle_glue import BundleConfigError, flag
from cbvae_ext.engine.knobs import TrainKnobs, knob_table, network_keys, train_knobs
from cbvae_ext.errors import CbvaeError
from cbvae_ext.presets import CONFIG_DIR, PresetError, architecture_preset, training_preset

TRAIN = yaml.safe_load((CONFIG_DIR / "train.yaml").read_text())
FIELDS = [f.name for f in dataclasses.fields(TrainKnobs)]


def _parser(*files: str, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIG_DIR / f) for f in files])
    parser.update(overrides)
    return parser


@pytest.fixture(scope="module")
def knobs(tmp_path_factory) -> dict:
    """The knobs as train.yaml sets them (the values ``train_knobs`` receives from the bundle)."""
    out = tmp_path_factory.mktemp("knobs") / "run"
    parser = _parser("train.yaml", output_dir=str(out))
    return {name: parser.get_parsed_content(name) for name in FIELDS}


@pytest.mark.parametrize(("value", "expected"), [(True, True), ("false", False), ("FALSE", False), ("0", False),
                                                 ("true", True), ("Yes", True), (False, False), ("", False)])  # fmt: skip
def test_flag_reads_text_switches(value, expected) -> None:
    assert flag(value, "resident") is expected


def test_flag_rejects_anything_else() -> None:
    with pytest.raises(BundleConfigError, match="--channels_last must be true or false, got 'maybe'"):
        flag("maybe", "channels_last")
    assert issubclass(BundleConfigError, CbvaeError) and issubclass(BundleConfigError, ValueError)


def test_train_yaml_defaults_pass_the_knob_check(knobs) -> None:
    checked = train_knobs(**knobs)
    assert checked.resume is True and checked.autocast_dtype is None and checked.epoch_length is None
    assert checked.betas == (0.9, 0.995) and checked.device.type in ("cpu", "cuda")
    # command-line text becomes the field's type: "false" a bool, "null" None
    text = train_knobs(**{**knobs, "resume": "false", "epoch_length": "null", "channels_last": "FALSE"})
    assert text.resume is False and text.epoch_length is None and text.channels_last is False


def test_one_declaration_of_the_knobs() -> None:
    # the config passes every TrainKnobs field once, under its own name, and nothing else
    block = {k: v for k, v in TRAIN["knobs"].items() if not k.startswith("_")}
    assert list(block) == FIELDS and all(v == f"@{k}" for k, v in block.items())
    # every top-level key declared above the knobs item is a knob (but MONAI's and the derived ones)
    above = list(TRAIN)[: list(TRAIN).index("knobs")]
    assert set(above) - {"imports", "bundle_root", "ckpt_dir"} == set(FIELDS)
    assert TRAIN["hyper_params"] == "$@knobs.hyper_params()"


def test_every_knob_is_logged(knobs) -> None:
    params = train_knobs(**knobs).hyper_params()
    assert list(params) == FIELDS and params["free_bits"] == 32.0  # free_bits was never logged
    assert json.loads(json.dumps(params)) == params  # MLflow, W&B and TensorBoard take it as it is


def test_the_conditions_of_reproducibility_are_logged(knobs, caplog) -> None:
    import torch

    with caplog.at_level(logging.INFO, logger="cbvae_ext.engine.knobs"):
        train_knobs(**knobs)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("reproducibility:"))
    assert f"seed {knobs['seed']}," in line and f"{torch.get_num_threads()} CPU threads" in line


def test_the_documented_knob_table_is_generated() -> None:
    doc = (REPO_ROOT / "bundle" / "docs" / "architecture.md").read_text()
    found = re.search(r"<!-- knobs:begin -->\n(.*?)\n<!-- knobs:end -->", doc, re.S)
    assert found, "architecture.md lost its knob table markers"
    table = knob_table()
    assert found.group(1) == table, "run `python -m cbvae_ext.engine.knobs` and paste its table into architecture.md"
    assert {f"`{name}`" for name in FIELDS} <= {row.split(" | ")[0][2:] for row in table.splitlines()[2:]}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"lr": "nan"}, "--lr must be a number > 0, got 'nan'"),  # fire passes nan as text
        ({"lr": float("inf")}, "--lr must be a number > 0, got inf"),
        ({"free_bits": float("nan")}, "--free_bits must be a number >= 0, got nan"),  # was accepted
        ({"free_bits": -5}, "--free_bits must be a number >= 0, got -5"),
        ({"epochs": "abc"}, "--epochs must be a whole number >= 1, got 'abc'"),
        ({"epochs": 2.5}, "--epochs must be a whole number >= 1, got 2.5"),
        ({"latent_size": 0}, "--latent_size must be a whole number >= 1, got 0"),  # trained, then decode divided by 0
        ({"batch_size": -4}, "--batch_size must be a whole number >= 1, got -4"),
        ({"kl_factor": 1.0}, "--kl_factor must be a number > 1, got 1.0"),
        ({"lr_min_factor": 2}, "--lr_min_factor must be a number >= 0 and <= 1, got 2"),
        ({"betas": [0.9]}, r"--betas must be 2 numbers >= 0 and < 1, got \[0.9\]"),
        ({"betas": [0.9, 1.0]}, r"--betas must be 2 numbers >= 0 and < 1, got \[0.9, 1.0\]"),
        ({"autocast_dtype": "float8"}, "--autocast_dtype must be null, bfloat16 or float16, got 'float8'"),
        ({"resume": "maybe"}, "--resume must be true or false, got 'maybe'"),
        ({"kl_scale": "x"}, "--kl_scale must be excess or total, got 'x'"),
        ({"kl_control": "maybe"}, "--kl_control must be true or false, got 'maybe'"),  # was a traceback
        ({"task_penalty": "maybe"}, "--task_penalty must be identification or mse, got 'maybe'"),
        ({"growth_rate": 0}, "--growth_rate must be a whole number >= 1, got 0"),  # was a traceback
        ({"film_hidden": 0}, "--film_hidden must be a whole number >= 1, got 0"),  # was accepted
        ({"channels": []}, r"--channels must be a non-empty list of whole numbers >= 1, got \[\]"),
        ({"condition_dropout": 1.0}, "--condition_dropout must be a number >= 0 and < 1, got 1.0"),
        ({"model": "unet"}, "--model must be one of cbvae, baseline, got 'unet'"),
        ({"experiment_name": ""}, "--experiment_name must be a non-empty text, got ''"),
        ({"channels": [8, 0, 32]}, r"--channels must be a non-empty list of whole numbers >= 1, got \[8, 0, 32\]"),
        ({"block_layers": [2]}, r"--block_layers \[2\] needs len\(channels\) - 1 = 2 entries"),
        ({"network_overrides": "[1]"}, "--network_overrides must be a mapping like"),
        ({"network_overrides": {"channels": []}}, r"--network_overrides\['channels'\] must be a non-empty list"),
        ({"device": "tpu"}, "--device must be cpu, cuda or cuda:N, present on this machine, got 'tpu'"),
        ({"beta": 9.0}, r"--kl_cap \(8.0\) must be >= --beta \(9.0\)"),
        ({"preset": "tpu"}, "--preset must be one of cpu, gpu, got 'tpu'"),
        # "--preset gpu" alone used to relabel a CPU-preset run
        ({"preset": "gpu"}, r"--preset gpu does not change the settings; add the overlay instead"),
    ],
)
def test_bad_knobs_are_one_line_errors(knobs, override, message, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        train_knobs(**{**knobs, **override})
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(message, err), err


def test_network_override_keys_are_the_models_arguments() -> None:
    keys = network_keys()
    assert {"latent_size", "condition_dropout", "cond_mean_rank", "dilations", "resnet_widen"} <= set(keys)
    assert "self" not in keys and "bogus_key" not in keys


def test_presets_are_the_bundle_configs() -> None:
    gpu_overlay = yaml.safe_load((CONFIG_DIR / "preset_gpu.yaml").read_text())
    cpu, gpu = training_preset("cpu"), training_preset("gpu")
    assert cpu["channels_last"] and not cpu["resident"] and cpu["autocast_dtype"] is None
    assert gpu["resident"] and gpu["autocast_dtype"] == "bfloat16" and gpu["batch_size"] == gpu_overlay["batch_size"]
    # the architecture is network_def's arguments: each a knob of the same name, or a fixed choice
    refs = {k: v for k, v in TRAIN["network_def"].items() if isinstance(v, str) and v.startswith("@")}
    assert all(v == f"@{k}" for k, v in refs.items() if k not in ("model", "overrides")), refs
    assert architecture_preset("cpu") == {
        k: TRAIN[k] if k in refs else v
        for k, v in TRAIN["network_def"].items()
        if k not in ("_target_", "dataset_dir", "model", "overrides")
    }
    assert architecture_preset("gpu")["channels"] == gpu_overlay["channels"] == [16, 32, 64, 128]
    # the overlay sets only what differs; the rest of the GPU preset is train.yaml's
    assert all(gpu_overlay[k] != TRAIN[k] for k in gpu_overlay if k != "preset"), gpu_overlay
    assert architecture_preset("gpu")["latent_size"] == TRAIN["latent_size"] and gpu["compile"] is TRAIN["compile"]
    with pytest.raises(PresetError, match="unknown network preset 'tpu'; valid presets: cpu, gpu"):
        training_preset("tpu")


def test_gpu_overlay_through_monai_config_parser(capsys) -> None:
    gpu = _parser("train.yaml", "preset_gpu.yaml")
    assert {k: gpu.get_parsed_content(f"network_def#{k}") for k in architecture_preset("gpu")} == architecture_preset(
        "gpu"
    )
    knobs = gpu.get_parsed_content("knobs")  # the config's own check passes on the overlay's values
    assert knobs.preset == "gpu" and knobs.batch_size == 64 and knobs.autocast_dtype == "bfloat16"
    # the command line "--preset gpu" without the overlay is refused before anything is built
    with pytest.raises(SystemExit):
        _parser("train.yaml", preset="gpu").get_parsed_content("knobs")
    assert "add the overlay instead" in capsys.readouterr().err


# ---- the same checks through the real bundle CLI: each case costs only the CLI start-up (no training); one
# case per way a check is reached (a knob value, a network override, the device, the output folder) ----

#: case -> (extra arguments, the start of the one error line). ``OUT`` stands for the case's output folder.
CLI_CASES = {
    "free_bits_nan": (["--free_bits", "nan"], "--free_bits must be a number >= 0, got 'nan'"),  # was accepted
    "kl_scale": (["--kl_scale", "x"], "--kl_scale must be excess or total, got 'x'"),
    "network_overrides_key": (  # was accepted silently
        ["--network_overrides", "{'bogus_key': 1}"],
        "--network_overrides: unknown key(s) 'bogus_key'; known keys: act, adversary_hidden,",
    ),
    # a value the constructor refuses (dilations too short for the bottleneck grid): caught before any write
    "network_unbuildable": (["--network_overrides", "{'dilations': [1]}"], "cannot build the network"),
    "device": (["--device", "cuda"], "--device cuda: this machine has no CUDA device"),
    "output_file": ([], "--output_dir OUT is a file; choose a folder"),
    "output_dataset": ([], "--output_dir OUT is the dataset folder"),
    "output_read_only": ([], "--output_dir OUT: OUT is not writable (read-only)"),
}


def _snapshot(path: Path) -> dict:
    if path.is_file():
        return {"": path.read_bytes()}
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


def _read_only(folder: Path) -> bool:
    """Make ``folder`` read-only for this process (chmod; for root, which ignores modes, the immutable flag)."""
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False)
    return not os.access(folder, os.W_OK)


@pytest.fixture(scope="module")
def cli_results(tiny_dataset, tmp_path_factory):
    """Run every ``CLI_CASES`` command at once (as many at a time as there are cores); case -> (proc, out, before)."""
    import torch

    root = tmp_path_factory.mktemp("bad_knobs")
    runs, skipped = {}, {}
    for case, (extra, _) in CLI_CASES.items():
        out = root / case / "run"
        out.parent.mkdir()
        if case == "output_file":
            out.write_text("not a folder")
        elif case == "output_dataset":
            out = tiny_dataset
        elif case == "output_read_only":
            out.mkdir()
            if not _read_only(out):
                skipped[case] = "cannot make a folder read-only here"
                continue
        elif case == "device" and torch.cuda.is_available():
            skipped[case] = "this machine has CUDA"
            continue
        args = ["-m", "monai.bundle", "run", "training", "--config_file", "bundle/configs/train.yaml"]
        args += ["--dataset_dir", str(tiny_dataset), "--output_dir", str(out), "--epochs", "1", *extra]
        runs[case] = (args, out, _snapshot(out))

    def launch(args: list[str]) -> subprocess.CompletedProcess:
        return run_python(args, timeout=600)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        procs = dict(zip(runs, pool.map(launch, [args for args, _, _ in runs.values()]), strict=True))
    yield {case: (procs[case], out, before) for case, (_, out, before) in runs.items()}, skipped
    ro = root / "output_read_only" / "run"
    if ro.exists():
        subprocess.run(["chattr", "-i", str(ro)], capture_output=True, check=False)
        ro.chmod(0o755)


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_bad_knob_on_the_bundle_cli_is_one_line_before_any_write(cli_results, case) -> None:
    results, skipped = cli_results
    if case in skipped:
        pytest.skip(skipped[case])
    proc, out, before = results[case]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("error: " + CLI_CASES[case][1].replace("OUT", str(out))), errors[0]
    assert _snapshot(out) == before  # nothing created, nothing changed (the dataset folder included)
