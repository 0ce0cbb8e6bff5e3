"""The real bundle CLI on the tiny dataset: artefacts, tracking stores, resume after SIGKILL, DDP on CPU (gloo)."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import BUNDLE_ENV, run_bundle, training_command

pytestmark = pytest.mark.slow

OFF = ("--use_mlflow", "false", "--use_wandb", "false")


def _assert_run_folder(out: Path, epochs: int) -> pd.DataFrame:
    for name in ("model.pt", "network_config.json", "history.csv", "decoder.ts", "decoder_schema.json", "mask.nii.gz"):
        assert (out / name).is_file(), name
    assert (out / "latents.parquet").is_file()
    assert list((out / "checkpoints").glob("*.pt"))
    state = torch.load(out / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # the bare network, also under DDP
    hist = pd.read_csv(out / "history.csv")
    assert hist["epoch"].tolist() == list(range(1, epochs + 1))
    for col in ("loss", "recon", "kl", "imp", "adv", "adv_acc", "beta", "grl_lambda", "lr", "val_loss"):
        assert col in hist.columns, col
    return hist


def test_train_cbvae_with_tracking(tiny_dataset, repo_root, tmp_path):
    out = tmp_path / "run"
    run_bundle(
        training_command(tiny_dataset, out, 2, "--use_mlflow", "true", "--use_wandb", "true", "--log_every", "1")
    )
    hist = _assert_run_folder(out, 2)
    # per-term values are finite and the total is their weighted sum (weights 1)
    row = hist.iloc[-1]
    assert row["loss"] == pytest.approx(row["recon"] + row["beta"] * row["kl"] + row["imp"] + row["adv"], rel=1e-4)
    assert row["val_loss"] == pytest.approx(row["val_recon"] + row["val_kl"] + row["val_imp"], rel=1e-4)
    # the GRL ramp rises over the 4 steps; the cosine schedule lowers lr
    assert 0 < hist["grl_lambda"].iloc[0] < hist["grl_lambda"].iloc[1] <= 1.0
    assert hist["lr"].iloc[1] < hist["lr"].iloc[0]
    assert (out / "history.png").is_file()

    # MLflow: embedded sqlite store with the per-term, beta, lambda, accuracy and lr series
    with sqlite3.connect(out / "mlflow.db") as db:
        keys = {k for (k,) in db.execute("SELECT DISTINCT key FROM metrics")}
    want = {
        "train_loss",
        "train_recon",
        "train_kl",
        "train_beta",
        "train_grl_lambda",
        "train_adv_acc",
        "lr",
        "val_loss",
    }
    assert want <= keys, want - keys
    assert {"grl_lambda", "loss"} <= keys  # per-iteration records
    # W&B: an offline run folder
    assert list((out / "wandb").glob("offline-run-*")), list((out / "wandb").iterdir())


def test_train_baseline_overlay(tiny_runs):
    out = tiny_runs["baseline"]  # trained by the session fixture through the overlay
    hist = _assert_run_folder(out, 1)
    assert hist["imp"].iloc[0] == 0.0 and hist["adv"].iloc[0] == 0.0  # no imputation head, no adversary
    assert json.loads((out / "network_config.json").read_text())["model"] == "baseline"
    assert json.loads((tiny_runs["cbvae"] / "network_config.json").read_text())["model"] == "cbvae"


def test_resume_after_sigkill(tiny_dataset, repo_root, tmp_path):
    out = tmp_path / "resumed"
    # a text "false" override passes through the config's switches (flag() is unit-tested)
    args = training_command(tiny_dataset, out, 3, *OFF, "--channels_last", "false")
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=repo_root, env=BUNDLE_ENV, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 600
        while not list((out / "checkpoints").glob("*_epoch=*.pt")):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 10 minutes"
            time.sleep(0.5)
        os.kill(proc.pid, signal.SIGKILL)  # an interruption: no handler gets to run
    finally:
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    saved = int(next((out / "checkpoints").glob("*_epoch=*.pt")).stem.split("=")[-1])
    assert saved < 3

    second = run_bundle(args)
    text = second.stdout + second.stderr
    assert "Restored all variables from" in text  # MONAI CheckpointLoader
    # only the epochs after the checkpoint ran again
    done = sorted(int(m) for m in re.findall(r"SupervisedTrainer - INFO - Epoch\[(\d+)\] Complete", text))
    assert done == list(range(saved + 1, 4))
    hist = _assert_run_folder(out, 3)
    assert hist["epoch"].is_unique


def test_ddp_two_processes_gloo(tiny_dataset, repo_root, tmp_path):
    out = tmp_path / "ddp"
    # the GPU preset's code paths on CPU: per-rank shards of a resident split, bf16 autocast
    gpu_paths = ("--resident", "true", "--autocast_dtype", "bfloat16")
    args = training_command(tiny_dataset, out, 1, *OFF, *gpu_paths, configs=("train.yaml", "multi_gpu_train.yaml"))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = run_bundle(args[1:], launcher=[*launcher, "-m"])
    hist = _assert_run_folder(out, 1)
    assert hist["grl_lambda"].iloc[0] > 0
    assert "Saved checkpoint at epoch: 1" in proc.stdout + proc.stderr
