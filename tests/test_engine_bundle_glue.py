"""Bundle glue: text switches, the knob checks (one-line errors), and the presets read from the bundle configs."""

from __future__ import annotations

import re

import pytest
import yaml

from cbvae_ext.engine.bundle_glue import BundleConfigError, check_knobs, flag
from cbvae_ext.errors import CbvaeError
from cbvae_ext.presets import CONFIG_DIR, PresetError, architecture_preset, training_preset

#: The knobs as train.yaml sets them (the values check_knobs receives from the bundle).
TRAIN = yaml.safe_load((CONFIG_DIR / "train.yaml").read_text())
KNOBS = {k: TRAIN[k] for k in TRAIN["knobs"] if not k.startswith("_")}


@pytest.mark.parametrize(("value", "expected"), [(True, True), ("false", False), ("FALSE", False), ("0", False),
                                                 ("true", True), ("Yes", True), (False, False), ("", False)])  # fmt: skip
def test_flag_reads_text_switches(value, expected) -> None:
    assert flag(value, "resident") is expected


def test_flag_rejects_anything_else() -> None:
    with pytest.raises(BundleConfigError, match="--channels_last must be true or false, got 'maybe'"):
        flag("maybe", "channels_last")
    assert issubclass(BundleConfigError, CbvaeError) and issubclass(BundleConfigError, ValueError)


def test_train_yaml_defaults_pass_the_knob_check() -> None:
    assert check_knobs(**KNOBS) == KNOBS


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"lr": "nan"}, "--lr must be a number > 0, got 'nan'"),  # fire passes nan as text
        ({"lr": float("inf")}, "--lr must be a number > 0, got inf"),
        ({"epochs": "abc"}, "--epochs must be a whole number >= 1, got 'abc'"),
        ({"epochs": 2.5}, "--epochs must be a whole number >= 1, got 2.5"),
        ({"latent_size": 0}, "--latent_size must be a whole number >= 1, got 0"),  # trained, then decode divided by 0
        ({"batch_size": -4}, "--batch_size must be a whole number >= 1, got -4"),
        ({"kl_factor": 1.0}, "--kl_factor must be a number > 1, got 1.0"),
        ({"lr_min_factor": 2}, "--lr_min_factor must be a number >= 0 and <= 1, got 2"),
        ({"betas": [0.9]}, "--betas must be two numbers in [0, 1), got [0.9]"),
        ({"autocast_dtype": "float8"}, "--autocast_dtype must be null, bfloat16 or float16, got 'float8'"),
        ({"resume": "maybe"}, "--resume must be true or false, got 'maybe'"),
        ({"beta": 9.0}, r"--kl_cap \(8.0\) must be >= --beta \(9.0\)"),
        ({"preset": "tpu"}, "--preset must be one of cpu, gpu, got 'tpu'"),
        # "--preset gpu" alone used to relabel a CPU-preset run
        ({"preset": "gpu"}, r"--preset gpu does not change the settings; add the overlay instead"),
    ],
)
def test_bad_knobs_are_one_line_errors(override, message, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        check_knobs(**{**KNOBS, **override})
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(message, err), err


def test_presets_are_the_bundle_configs() -> None:
    gpu_overlay = yaml.safe_load((CONFIG_DIR / "preset_gpu.yaml").read_text())
    cpu, gpu = training_preset("cpu"), training_preset("gpu")
    assert cpu["channels_last"] and not cpu["resident"] and cpu["autocast_dtype"] is None
    assert gpu["resident"] and gpu["autocast_dtype"] == "bfloat16" and gpu["batch_size"] == gpu_overlay["batch_size"]
    assert architecture_preset("cpu") == {k: TRAIN[k] for k in TRAIN["architecture"]}
    assert architecture_preset("gpu")["channels"] == gpu_overlay["channels"] == [16, 32, 64, 128]
    # the overlay sets every architecture and batch key the CPU preset has, so it is a complete preset
    assert set(TRAIN["architecture"]) | set(cpu) <= set(gpu_overlay)
    with pytest.raises(PresetError, match="unknown network preset 'tpu'; valid presets: cpu, gpu"):
        training_preset("tpu")


def _parser(*files: str, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIG_DIR / f) for f in files])
    parser.update(overrides)
    return parser


def test_gpu_overlay_through_monai_config_parser(capsys) -> None:
    gpu = _parser("train.yaml", "preset_gpu.yaml")
    assert gpu.get_parsed_content("architecture") == architecture_preset("gpu")
    knobs = gpu.get_parsed_content("knobs")  # the config's own check passes on the overlay's values
    assert knobs["preset"] == "gpu" and knobs["batch_size"] == 64 and knobs["autocast_dtype"] == "bfloat16"
    # the command line "--preset gpu" without the overlay is refused before anything is built
    with pytest.raises(SystemExit):
        _parser("train.yaml", preset="gpu").get_parsed_content("knobs")
    assert "add the overlay instead" in capsys.readouterr().err
