"""Shared fixtures: real Neurosynth data, a tiny dataset and tiny trained runs made by the real bundle CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _neurosynth_dir() -> Path:
    return Path(os.environ.get("CBVAE_NEUROSYNTH_DIR", REPO_ROOT.parent / "shared" / "data" / "neurosynth"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def neurosynth_dir() -> Path:
    """Real Neurosynth v7 files (CBVAE_NEUROSYNTH_DIR, default ../shared/data/neurosynth)."""
    path = _neurosynth_dir()
    if not (path / "data-neurosynth_version-7_coordinates.tsv.gz").is_file():
        pytest.fail(f"Neurosynth v7 files not found in {path}; set CBVAE_NEUROSYNTH_DIR to a copy")
    return path


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory, neurosynth_dir: Path) -> Path:
    """A 120-study stratified subset at 4 mm, built once per session by the real builder."""
    from cbvae_ext.data import build_dataset

    out = tmp_path_factory.mktemp("data") / "tiny"
    return Path(build_dataset(neurosynth_dir=neurosynth_dir, out=out, subset=120, resolution=4))


def train_bundle(dataset_dir: Path, output_dir: Path, baseline: bool = False, *overrides: str) -> Path:
    """Train through the real bundle CLI (`python -m monai.bundle run training`) with tiny settings."""
    configs = ["bundle/configs/train.yaml"] + (["bundle/configs/train_baseline.yaml"] if baseline else [])
    config_arg = configs[0] if len(configs) == 1 else str(configs)
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", config_arg,
        "--dataset_dir", str(dataset_dir),
        "--output_dir", str(output_dir),
        "--epochs", "1",
        "--use_wandb", "false",
        "--use_mlflow", "false",
        "--progress", "false",
        # a tiny network and short epochs: these fixtures test the plumbing, not the model
        "--epoch_length", "2",
        "--val_epoch_length", "1",
        "--batch_size", "4",
        "--network_overrides", "{'channels': [4, 8], 'block_layers': [1], 'growth_rate': 4}",
        *overrides,
    ]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"bundle training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return output_dir


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> dict[str, Path]:
    """One C-β-VAE and one baseline run, each trained for one epoch on the tiny dataset."""
    root = tmp_path_factory.mktemp("runs")
    return {
        "cbvae": train_bundle(tiny_dataset, root / "cbvae"),
        "baseline": train_bundle(tiny_dataset, root / "baseline", True),
    }
