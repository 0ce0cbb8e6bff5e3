"""The real bundle CLI on the tiny dataset: artefacts, tracking stores, resume after SIGKILL, DDP on CPU (gloo)."""

from __future__ import annotations

import ast
import copy
import dataclasses
import fcntl
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import run_bundle, run_python, start_python, training_command

from cbvae_ext.data import build_dataset
from cbvae_ext.engine.knobs import TrainKnobs
from cbvae_ext.engine.resume import LOCK_FILE, resume_checkpoint
from cbvae_ext.networks import build_network, initialise_from_data

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
        training_command(
            tiny_dataset, out, 2, "--use_mlflow", "true", "--use_wandb", "true", "--use_tensorboard", "true",
            "--log_every", "1",
        )
    )  # fmt: skip
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

    # every knob is a hyper-parameter of every tracker (was: a separate list, free_bits never logged)
    knobs = [f.name for f in dataclasses.fields(TrainKnobs)]
    with sqlite3.connect(out / "mlflow.db") as db:
        params = dict(db.execute("SELECT key, value FROM params"))
    assert set(knobs) <= set(params), set(knobs) - set(params)
    assert params["free_bits"] == "32.0" and params["epochs"] == "2" and params["use_tensorboard"] == "True"
    # the config wandb.init received, as its offline debug log records it
    log = next((out / "wandb").glob("offline-run-*/logs/debug.log")).read_text()
    wandb_config = ast.literal_eval(re.findall(r"config: (\{'.*\})$", log, re.M)[-1])
    assert [k for k in wandb_config if k != "_wandb"] == knobs and wandb_config["free_bits"] == 32.0
    assert set(knobs) == _tensorboard_hparams(out / "tensorboard")


def _tensorboard_hparams(log_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    names: set[str] = set()
    for path in log_dir.glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    names |= set(data.session_start_info.hparams)
    return names


def test_train_baseline_overlay(tiny_runs):
    out = tiny_runs["baseline"]  # trained by the session fixture through the overlay
    hist = _assert_run_folder(out, 1)
    assert hist["imp"].iloc[0] == 0.0 and hist["adv"].iloc[0] == 0.0  # no imputation head, no adversary
    assert json.loads((out / "network_config.json").read_text())["model"] == "baseline"
    assert json.loads((tiny_runs["cbvae"] / "network_config.json").read_text())["model"] == "cbvae"


def test_resume_after_sigkill(tiny_dataset, tmp_path):
    out = tmp_path / "resumed"
    # a text "false" override passes through the config's switches (flag() is unit-tested)
    args = training_command(tiny_dataset, out, 3, *OFF, "--channels_last", "false")
    log = open(tmp_path / "first.log", "w")
    proc = start_python(args, log)
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
    # the conditional-mean path was fitted (was: the overlay's copy of `initialize` skipped the fit, so the
    # path kept a constant intercept and zero coefficients), and equals a single-process fit
    state = torch.load(out / "model.pt", weights_only=True)
    assert state["cond_mean.weight"].abs().max() > 0 and state["cond_mean.basis"].abs().max() > 0
    _assert_path_is(state, _fitted(out, tiny_dataset))


def _fitted(run: Path, dataset: Path, **options) -> torch.nn.Module:
    """The conditional-mean path of the run's network, fitted in this process by ``initialise_from_data``."""
    network = build_network(json.loads((run / "network_config.json").read_text()))
    return initialise_from_data(network, dataset, **options).cond_mean


def _assert_path_is(state: dict[str, torch.Tensor], path: torch.nn.Module) -> None:
    torch.testing.assert_close(state["cond_mean.intercept"], path.intercept, rtol=1e-5, atol=1e-6)
    # the low-rank factors are unique only up to signs: compare the coefficients they make (exact rows included)
    stored = copy.deepcopy(path)
    stored.load_state_dict({k.removeprefix("cond_mean."): v for k, v in state.items() if k.startswith("cond_mean.")})
    torch.testing.assert_close(stored.coefficients(), path.coefficients(), rtol=1e-4, atol=1e-5)


def test_task_penalty_knob_reaches_the_conditional_mean_fit(tiny_dataset, tiny_runs, neurosynth_dir, tmp_path):
    """--task_penalty mse fits the path with the squared-error rule; the default with the identification rule."""
    # the same 120 studies without the terms condition: there the two rules choose different task penalties
    # (with it both shrink the tiny dataset's path to the largest penalties)
    plain = build_dataset(neurosynth_dir=neurosynth_dir, out=tmp_path / "plain", subset=120, resolution=4)
    out = tmp_path / "mse"
    run_bundle(training_command(plain, out, 1, *OFF, "--task_penalty", "mse"))
    mse, ident = _fitted(out, plain, identify_task=False), _fitted(out, plain, identify_task=True)
    assert mse.alpha != ident.alpha
    _assert_path_is(torch.load(out / "model.pt", weights_only=True), mse)
    default = _fitted(tiny_runs["cbvae"], tiny_dataset, identify_task=True)
    _assert_path_is(torch.load(tiny_runs["cbvae"] / "model.pt", weights_only=True), default)


def _bundle(args: list[str]) -> subprocess.CompletedProcess:
    """A bundle command that may fail (``run_bundle`` fails the test on a non-zero status)."""
    return run_python(args)


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def test_rejected_commands_leave_a_finished_run_untouched(tiny_runs, tiny_dataset, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_runs["cbvae"], run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    # another build of the dataset (its manifest, hence its checksum and splits, differ)
    rebuilt = tmp_path / "rebuilt"
    shutil.copytree(tiny_dataset, rebuilt)
    manifest = json.loads((rebuilt / "manifest.json").read_text())
    (rebuilt / "manifest.json").write_text(json.dumps({**manifest, "rebuilt": True}))

    # was: resumed silently, then recorded the new build's checksum so evaluation's check passed
    err = _one_line_error(_bundle(training_command(rebuilt, run, 2, *OFF)))
    assert err.startswith("error: cannot resume from ") and "dataset_manifest_sha256" in err
    err = _one_line_error(_bundle(training_command(tiny_dataset, run, 2, *OFF, "--latent_size", "16")))
    assert "latent_size 32 -> 16" in err
    # was: network_config.json rewritten, then a 60-line MONAI traceback
    err = _one_line_error(_bundle(training_command(tiny_dataset, run, 2, *OFF, "--lr", "nan")))
    assert err == "error: --lr must be a number > 0, got 'nan'"
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_resume_skips_a_damaged_checkpoint_and_keeps_the_best_model(tiny_runs, tiny_dataset, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_runs["cbvae"], run)
    best = (run / "model.pt").read_bytes()
    (run / "checkpoints" / "checkpoint_epoch=2.pt").write_bytes(b"")  # a kill during the old in-place write
    # what a kill during an atomic write leaves: ignite's temporary checkpoint, run_folder's temporary file
    (run / "checkpoints" / "tmpk1ll3d_0").write_bytes(b"partial")
    (run / ".history.json.abcd1234.tmp").write_bytes(b"partial")
    # a large learning rate makes epoch 2 worse on validation than epoch 1
    proc = run_bundle(training_command(tiny_dataset, run, 2, *OFF, "--lr", "1.0"))
    text = proc.stdout + proc.stderr
    assert re.search(r"skipping damaged checkpoint .*checkpoint_epoch=2.pt \(EOFError\)", text)  # was EOFError crash
    assert re.search(r"Restored all variables from .*checkpoint_epoch=1.pt", text)
    hist = _assert_run_folder(run, 2)
    assert hist["val_loss"].iloc[1] > hist["val_loss"].iloc[0]
    assert (run / "model.pt").read_bytes() == best  # was replaced by the first validation after the resume
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["checkpoint_epoch=2.pt"]  # was: tmp* left
    assert not list(run.glob("*.tmp"))
    state = torch.load(run / "checkpoints" / "checkpoint_epoch=2.pt", weights_only=True)
    assert state["best_model"]["best_metric"] == pytest.approx(hist["val_loss"].iloc[0], rel=1e-6)


def test_resume_false_archives_the_previous_runs_checkpoints(tiny_runs, tiny_dataset, tmp_path):
    """Was: ``--resume false`` left the old checkpoints, and a later plain rerun resumed the run before it.

    The previous run's checkpoint is named for a later epoch (3) than the new run reaches (1), as when a run
    killed after its first epoch follows a finished three-epoch run.
    """
    run = tmp_path / "run"
    shutil.copytree(tiny_runs["cbvae"], run)
    old = run / "checkpoints" / "checkpoint_epoch=3.pt"
    (run / "checkpoints" / "checkpoint_epoch=1.pt").rename(old)
    old_bytes = old.read_bytes()
    proc = run_bundle(training_command(tiny_dataset, run, 1, *OFF, "--resume", "false"))
    assert "Restored all variables" not in proc.stdout + proc.stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["checkpoint_epoch=1.pt"]  # this run's only
    archived = list(run.glob("checkpoints.old-*"))
    assert len(archived) == 1 and (archived[0] / old.name).read_bytes() == old_bytes  # kept, not deleted
    # what a plain rerun resumes from: this run's epoch 1 (was: the previous run's "epoch 3")
    config = json.loads((run / "network_config.json").read_text())
    assert resume_checkpoint(run / "checkpoints", True, config) == str(run / "checkpoints" / "checkpoint_epoch=1.pt")


def test_second_training_into_a_locked_output_dir_is_refused(tiny_dataset, tmp_path):
    """Was: two trainings into one --output_dir both exited 0, files last-writer-wins."""
    run = tmp_path / "run"
    run.mkdir()
    with open(run / LOCK_FILE, "a") as held:  # the first training, as the CLI holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        err = _one_line_error(_bundle(training_command(tiny_dataset, run, 1, *OFF)))
    assert err == (
        f"error: --output_dir {run} is in use by another training (it holds {run / LOCK_FILE}); wait for it to "
        "finish or choose another --output_dir"
    )
    assert [p.name for p in run.iterdir()] == [LOCK_FILE]  # nothing written
