"""Handlers on a tiny ignite Engine: KL controller, GRL λ ramp, epoch means, history, checkpoints and resume."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from ignite.engine import Engine, Events
from matplotlib.image import imread

from cbvae_ext.engine import GRLSchedule, History, KLController, MeanTerms, dann_lambda
from cbvae_ext.engine.history import plot_training_curves, training_curves_figure
from cbvae_ext.engine.loaders import ResidentBatches
from cbvae_ext.engine.losses import CBVAELoss
from cbvae_ext.engine.resume import (
    AtomicCheckpointSaver,
    ResumeError,
    RunFingerprint,
    last_checkpoint,
    resume_checkpoint,
)
from cbvae_ext.networks.heads import GradientReversal


def _engine(outputs) -> Engine:
    """Engine whose iteration returns ``outputs(engine)``; per-term means land in state.metrics["train_*"]."""
    engine = Engine(lambda e, _: outputs(e))
    MeanTerms(keys=("loss", "kl", "adv_acc"), prefix="train_").attach(engine, "terms")
    return engine


def test_mean_terms_averages_and_skips_nan():
    values = iter([{"loss": 1.0, "kl": 2.0, "adv_acc": math.nan}, {"loss": 3.0, "kl": 4.0, "adv_acc": 0.5}])
    engine = _engine(lambda e: next(values))
    engine.run([0, 1], max_epochs=1)
    assert engine.state.metrics == {"train_loss": 2.0, "train_kl": 3.0, "train_adv_acc": 0.5}


def test_kl_controller_raises_beta_when_kl_is_suppressed(caplog):
    loss = CBVAELoss(beta=1.0)
    # KL artificially suppressed: 1% of the loss every epoch
    engine = _engine(lambda e: {"loss": 100.0, "kl": 1.0, "adv_acc": 0.1})
    controller = KLController(loss, threshold=0.05, patience=3, factor=2.0, cap=3.0, scale="total")
    controller.attach(engine)
    betas = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: betas.append(loss.beta))
    with caplog.at_level(logging.INFO, logger=engine.logger.name):
        engine.run([0, 1], max_epochs=7)
    assert betas == [1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 3.0]  # x2 after 3 low epochs, then capped at 3
    assert [c["epoch"] for c in controller.changes] == [3, 6]
    assert "beta 1 -> 2" in caplog.text and "beta 2 -> 3" in caplog.text
    # state round trip (what CheckpointSaver/CheckpointLoader store)
    other = KLController(CBVAELoss(beta=1.0), cap=3.0)
    other.load_state_dict(controller.state_dict())
    assert other.loss.beta == 3.0 and other.changes == controller.changes


def test_kl_controller_keeps_beta_when_kl_is_healthy():
    loss = CBVAELoss(beta=1.0)
    engine = _engine(lambda e: {"loss": 100.0, "kl": 30.0 if e.state.epoch % 3 else 1.0, "adv_acc": 0.1})
    KLController(loss, patience=3, scale="total").attach(engine)
    engine.run([0], max_epochs=9)  # low epochs never 3 in a row
    assert loss.beta == 1.0


def test_kl_controller_rejects_bad_settings():
    with pytest.raises(ValueError, match="factor"):
        KLController(CBVAELoss(), factor=1.0)
    with pytest.raises(ValueError, match="cap"):
        KLController(CBVAELoss(beta=4.0), cap=2.0)


def test_dann_ramp_values():
    assert dann_lambda(0.0) == 0.0
    assert dann_lambda(0.5, gamma=10) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert dann_lambda(1.0, gamma=10, lambda_max=0.5) == pytest.approx(0.5 * (2 / (1 + math.exp(-10)) - 1))
    assert dann_lambda(2.0) == dann_lambda(1.0)


def test_grl_schedule_ramps_network_lambda_over_steps():
    net = torch.nn.Module()
    net.grl = GradientReversal(lambda_=1.0)
    seen = []
    engine = Engine(lambda e, _: seen.append(net.grl.lambda_))
    schedule = GRLSchedule(net, gamma=10.0, lambda_max=0.8)
    schedule.attach(engine)
    engine.run(range(5), max_epochs=4)  # 20 steps
    assert len(seen) == 20 and seen[0] == 0.0
    assert seen == pytest.approx([dann_lambda(i / 20, 10.0, 0.8) for i in range(20)])
    assert all(b > a for a, b in zip(seen, seen[1:], strict=False))
    assert schedule.state_dict()["lambda_"] == pytest.approx(seen[-1])


def test_grl_schedule_leaves_a_model_without_adversary_alone():
    engine = Engine(lambda e, _: None)
    net = torch.nn.Linear(2, 2)
    schedule = GRLSchedule(net, gamma=10.0, lambda_max=1.0)
    schedule.attach(engine)
    engine.run([0, 1], max_epochs=2)
    assert not hasattr(net, "grl")  # nothing was set on the baseline
    assert schedule.lambda_ == pytest.approx(dann_lambda(3 / 4, 10.0, 1.0))  # the schedule still advanced


def test_history_writes_rows_and_plot_and_truncates_on_resume(tmp_path):
    engine = Engine(lambda e, _: {"loss": float(e.state.epoch), "kl": 0.5, "adv_acc": 0.25, "lr": 0.1})
    MeanTerms(keys=("loss", "kl", "adv_acc", "lr"), prefix="train_").attach(engine, "terms")
    evaluator = Engine(lambda e, _: None)
    evaluator.state.metrics = {"val_loss": 7.0}
    History(tmp_path, evaluator=evaluator).attach(engine)
    engine.run([0, 1], max_epochs=3)
    hist = pd.read_csv(tmp_path / "history.csv")
    assert hist["epoch"].tolist() == [1, 2, 3]
    assert hist["loss"].tolist() == [1.0, 2.0, 3.0]
    assert hist["lr"].tolist() == [0.1] * 3 and hist["val_loss"].tolist() == [7.0] * 3
    assert (tmp_path / "history.json").is_file()

    # a resumed run restored at epoch 2 drops the third row before appending
    resumed = Engine(lambda e, _: {"loss": 10.0, "kl": 0.5, "adv_acc": 0.25})
    MeanTerms(keys=("loss",), prefix="train_").attach(resumed, "terms")
    History(tmp_path).attach(resumed)
    resumed.state.epoch = 2
    resumed.state.max_epochs = 4
    resumed.run([0], max_epochs=4)
    hist = pd.read_csv(tmp_path / "history.csv")
    assert hist["epoch"].tolist() == [1, 2, 3, 4]
    assert hist["loss"].tolist() == [1.0, 2.0, 10.0, 10.0]


def test_history_png_of_the_training_curves(tmp_path, foreign_savefig_settings):
    engine = Engine(lambda e, _: {"loss": 1.0, "beta": 1.0 + e.state.epoch, "grl_lambda": 0.1 * e.state.epoch})
    MeanTerms(keys=("loss", "beta", "grl_lambda"), prefix="train_").attach(engine, "terms")
    History(tmp_path).attach(engine)
    engine.run([0], max_epochs=2)
    assert pd.read_csv(tmp_path / "history.csv")["beta"].tolist() == [2.0, 3.0]
    height, width = imread(tmp_path / "history.png").shape[:2]
    assert height == 2 * 240 + 60 and width == 750  # loss and β/λ panels; no recon, KL or adversary columns


def _history(epochs: int) -> pd.DataFrame:
    """A history frame with every column History writes for a C-β-VAE run (train, val, β, λ)."""
    e = np.arange(1, epochs + 1, dtype=np.float64)
    frame = {"epoch": e.astype(int), "loss": 100 / e, "recon": 80 / e, "floor": np.full_like(e, 20.0), "kl": 5 + e}
    frame |= {"cm": 90 / e, "imp": e * 0, "adv": 1.3 + e * 0, "adv_acc": 0.3 - 0.01 * e, "grad_norm": e * 0 + 1}
    frame |= {"beta": np.minimum(e / 2, 1.0), "grl_lambda": 1 - 1 / e, "lr": e * 0 + 1e-3}
    frame |= {"val_loss": 110 / e, "val_recon": 90 / e, "val_floor": 20 + e * 0, "val_kl": 6 + e}
    frame |= {"val_cm": 95 / e, "val_imp": e * 0, "val_adv": 1.4 + e * 0, "val_adv_acc": 0.28 + e * 0}
    return pd.DataFrame(frame)


def _panels(fig) -> list[set[str]]:
    """Line labels per panel (a twin axis shares its panel's grid row), top to bottom."""
    rows: dict[int, set[str]] = {}
    for ax in fig.axes:
        rows.setdefault(ax.get_subplotspec().rowspan.start, set()).update(ln.get_label() for ln in ax.get_lines())
    return [rows[k] for k in sorted(rows)]


def test_training_curves_panels_follow_the_columns_present():
    full = _panels(training_curves_figure(_history(5)))
    assert [len(p) for p in full] == [2, 5, 2, 2]  # loss, recon/KL (+ entropy floor), β/λ, adversary accuracy
    assert {"train loss (β-weighted objective)", "val loss (−ELBO at β = 1, + imputation)"} == full[0]
    assert {"train recon", "val recon", "train KL", "val KL"} < full[1] and {
        "β (KL weight)",
        "λ (GRL, epoch mean)",
    } == full[2]
    # a baseline without validation or adversary: no val lines, its NaN accuracies skip the last panel
    base = _history(5).filter(regex="^(?!val_)").assign(adv_acc=np.nan).drop(columns="grl_lambda")
    panels = _panels(training_curves_figure(base))
    assert len(panels) == 3 and not any(lab.startswith("val") for p in panels for lab in p)
    assert panels[2] == {"β (KL weight)"}  # λ missing: β alone, no twin axis
    assert training_curves_figure(pd.DataFrame({"epoch": [1], "lr": [0.1]})) is None  # nothing to draw


def test_training_curves_of_one_epoch(tmp_path, foreign_savefig_settings):
    path = plot_training_curves(_history(1), tmp_path / "curves.png")
    height, width = imread(path).shape[:2]
    assert (width, height) == (750, 4 * 240 + 60)
    bottom = next(ax for ax in training_curves_figure(_history(1)).axes if ax.get_xlabel() == "epoch")
    lo, hi = bottom.get_xlim()
    assert (lo, hi) == (0.5, 1.5) and [t for t in bottom.get_xticks() if lo <= t <= hi] == [1.0]  # integer epochs
    assert plot_training_curves(pd.DataFrame({"epoch": [1]}), tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_last_checkpoint_picks_newest_epoch(tmp_path):
    assert last_checkpoint(tmp_path / "missing") is None
    for n in (2, 10, 9):
        (tmp_path / f"checkpoint_epoch={n}.pt").write_bytes(b"x")
    assert last_checkpoint(tmp_path).endswith("checkpoint_epoch=10.pt")
    assert last_checkpoint(tmp_path, enabled=False) is None


def test_resident_batches_cover_every_row_once_per_epoch_and_shard():
    data = {"image": torch.arange(10).float(), "year_bin": torch.arange(10)}
    full = ResidentBatches(data, batch_size=3, seed=1)
    first = torch.cat([b["year_bin"] for b in full])
    second = torch.cat([b["year_bin"] for b in full])
    assert sorted(first.tolist()) == list(range(10)) and first.tolist() != second.tolist() and len(full) == 4
    shards = [ResidentBatches(data, batch_size=2, seed=1, rank=r, world_size=2) for r in range(2)]
    rows = [torch.cat([b["year_bin"] for b in s]).tolist() for s in shards]
    assert sorted(rows[0] + rows[1]) == list(range(10)) and not set(rows[0]) & set(rows[1])
    # 9 rows on 2 ranks: padded to 5 rows each, so both ranks run the same number of batches (DDP)
    odd = {"year_bin": torch.arange(9)}
    shards = [ResidentBatches(odd, batch_size=4, seed=1, rank=r, world_size=2) for r in range(2)]
    assert [len(s) for s in shards] == [2, 2]
    rows = [torch.cat([b["year_bin"] for b in s]).tolist() for s in shards]
    assert [len(r) for r in rows] == [5, 5] and set(rows[0] + rows[1]) == set(range(9))
    with pytest.raises(ValueError, match="one length"):
        ResidentBatches({"a": torch.zeros(2), "b": torch.zeros(3)}, batch_size=1)


def test_grl_schedule_logs_through_the_engine_logger(caplog):
    # the multi-GPU overlay mutes ranks > 0 by setting the engines' logger levels
    engine = Engine(lambda e, _: None)
    engine.logger = logging.getLogger("muted-trainer")
    engine.logger.setLevel(logging.WARNING)
    GRLSchedule(torch.nn.Linear(1, 1), log_every=1).attach(engine)
    with caplog.at_level(logging.INFO):
        engine.run([0, 1], max_epochs=1)
    assert not [r for r in caplog.records if "GRL lambda" in r.getMessage()]  # was logged by its own module logger
    engine.logger.setLevel(logging.INFO)
    with caplog.at_level(logging.INFO):
        engine.run([0, 1], max_epochs=2)
    assert [r.name for r in caplog.records if "GRL lambda" in r.getMessage()] == ["muted-trainer"] * 2


class _Exploding:
    """A save_dict entry whose state cannot be pickled: ``torch.save`` fails part-way, like a kill mid-write."""

    def __init__(self) -> None:
        self.explode = False

    def state_dict(self) -> dict:
        return {"x": (lambda: None) if self.explode else 1.0}


def _epoch_engine() -> Engine:
    return Engine(lambda e, _: None)


def test_atomic_saver_keeps_the_last_good_checkpoint_when_a_write_fails(tmp_path):
    part = _Exploding()
    engine = _epoch_engine()
    saver = AtomicCheckpointSaver(
        str(tmp_path), {"model": torch.nn.Linear(2, 2), "part": part}, save_interval=1, n_saved=1
    )
    saver.attach(engine)
    engine.add_event_handler(Events.EPOCH_COMPLETED(once=2), lambda _: setattr(part, "explode", True))  # after saving 2
    with pytest.raises(Exception, match="pickle|Can't"):
        engine.run([0], max_epochs=3)
    # MONAI's saver deleted checkpoint_epoch=2.pt, then left a partial checkpoint_epoch=3.pt: nothing loadable
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=2.pt"]
    assert torch.load(tmp_path / "checkpoint_epoch=2.pt", weights_only=True)["part"] == {"x": 1.0}


def test_atomic_saver_rotates_to_n_saved_across_a_resume(tmp_path):
    net = torch.nn.Linear(2, 2)
    engine = _epoch_engine()
    AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_interval=1, n_saved=1).attach(engine)
    engine.run([0], max_epochs=2)
    assert [p.name for p in tmp_path.iterdir()] == ["model_epoch=2.pt"]
    resumed = _epoch_engine()  # a new process: its saver adopts the checkpoint it resumed from
    AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_interval=1, n_saved=1).attach(resumed)
    resumed.state.epoch, resumed.state.max_epochs = 2, 4  # as the CheckpointLoader leaves it
    resumed.run([0], max_epochs=4)
    assert [p.name for p in tmp_path.iterdir()] == ["model_epoch=4.pt"]  # epoch 2 was left behind by MONAI's saver


def test_best_model_ranking_survives_a_resume(tmp_path):
    """A resumed run keeps model.pt until validation beats the best value from before the interruption."""
    losses = iter([5.0, 7.0])
    evaluator = Engine(lambda e, _: None)
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_loss=next(losses)))
    net = torch.nn.Linear(2, 2)
    kwargs = {"save_key_metric": True, "key_metric_name": "val_loss", "key_metric_negative_sign": True,
              "key_metric_filename": "model.pt"}  # fmt: skip
    saver = AtomicCheckpointSaver(str(tmp_path), {"model": net}, **kwargs)
    saver.attach(evaluator)
    evaluator.run([0], max_epochs=1)  # val_loss 5.0 -> model.pt
    state = saver.state_dict()
    assert [priority for priority, _ in state["_saved"]] == [-5.0]
    before = (tmp_path / "model.pt").read_bytes()

    torch.nn.init.constant_(net.weight, 3.0)  # training went on, then the process was killed
    resumed_evaluator = Engine(lambda e, _: None)
    resumed_evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_loss=next(losses)))
    resumed = AtomicCheckpointSaver(str(tmp_path), {"model": net}, **kwargs)
    resumed.attach(resumed_evaluator)
    resumed.load_state_dict(state)
    resumed_evaluator.run([0], max_epochs=1)  # val_loss 7.0 is worse than 5.0
    assert (tmp_path / "model.pt").read_bytes() == before  # was replaced by the first post-resume validation


def _fingerprinted(path: Path, config: dict) -> None:
    torch.save({"model": {}, "run_fingerprint": RunFingerprint(config).state_dict()}, path)


def test_resume_refuses_another_dataset_build_model_or_architecture(tmp_path, capsys):
    config = {"model": "cbvae", "latent_size": 32, "channels": [4, 8], "dataset_manifest_sha256": "a" * 64}
    _fingerprinted(tmp_path / "checkpoint_epoch=3.pt", config)
    assert resume_checkpoint(tmp_path, "true", config).endswith("checkpoint_epoch=3.pt")
    assert resume_checkpoint(tmp_path, "false", config) is None
    for change, shown in (
        ({"dataset_manifest_sha256": "b" * 64}, "dataset_manifest_sha256 'aaaaaaaaaaaa…' -> 'bbbbbbbbbbbb…'"),
        ({"latent_size": 16}, "latent_size 32 -> 16"),
        ({"model": "baseline"}, "model 'cbvae' -> 'baseline'"),
        ({"channels": [4, 8, 16]}, "channels [4, 8] -> [4, 8, 16]"),
    ):
        with pytest.raises(SystemExit) as stop:
            resume_checkpoint(tmp_path, True, {**config, **change})
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: cannot resume from ") and shown in err, err
    with pytest.raises(ResumeError, match="another dataset, model or architecture"):
        RunFingerprint({**config, "latent_size": 8}).load_state_dict(RunFingerprint(config).state_dict())


def test_resume_skips_a_damaged_checkpoint_and_refuses_one_without_fingerprint(tmp_path, capsys):
    config = {"model": "cbvae", "latent_size": 32}
    _fingerprinted(tmp_path / "checkpoint_epoch=2.pt", config)
    (tmp_path / "checkpoint_epoch=3.pt").write_bytes(b"")  # a kill during the old, non-atomic write
    with pytest.warns(UserWarning, match=r"skipping damaged checkpoint .*checkpoint_epoch=3.pt \(EOFError\)"):
        assert resume_checkpoint(tmp_path, True, config).endswith("checkpoint_epoch=2.pt")
    torch.save({"model": {}}, tmp_path / "checkpoint_epoch=4.pt")
    with pytest.raises(SystemExit):
        resume_checkpoint(tmp_path, True, config)
    assert "records no dataset/architecture fingerprint" in capsys.readouterr().err
