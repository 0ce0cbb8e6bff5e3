"""Config glue: command-line switches arrive as text and must be read as bools."""

from __future__ import annotations

import pytest

from cbvae_ext.engine.workflow import BundleConfigError, flag, training_preset


@pytest.mark.parametrize(("value", "expected"), [(True, True), ("false", False), ("FALSE", False), ("0", False),
                                                 ("true", True), ("Yes", True), (False, False), ("", False)])  # fmt: skip
def test_flag_reads_text_switches(value, expected) -> None:
    assert flag(value, "resident") is expected


def test_flag_rejects_anything_else() -> None:
    with pytest.raises(BundleConfigError, match="--channels_last must be true or false, got 'maybe'"):
        flag("maybe", "channels_last")


def test_presets() -> None:
    cpu, gpu = training_preset("cpu"), training_preset("gpu")
    assert cpu["channels_last"] and not cpu["resident"] and cpu["autocast_dtype"] is None
    assert gpu["resident"] and gpu["autocast_dtype"] == "bfloat16"
    with pytest.raises(BundleConfigError, match="--preset must be one of cpu, gpu, got 'tpu'"):
        training_preset("tpu")
