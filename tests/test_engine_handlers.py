"""Handlers on a tiny ignite Engine: KL controller, GRL λ ramp, epoch means, history, checkpoint lookup."""

from __future__ import annotations

import logging
import math

import pandas as pd
import pytest
import torch
from ignite.engine import Engine, Events

from cbvae_ext.engine import GRLSchedule, History, KLController, MeanTerms, dann_lambda
from cbvae_ext.engine.loaders import ResidentBatches
from cbvae_ext.engine.losses import CBVAELoss
from cbvae_ext.engine.resume import last_checkpoint
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


def test_history_png_of_beta_and_lambda(tmp_path):
    engine = Engine(lambda e, _: {"loss": 1.0, "beta": 1.0 + e.state.epoch, "grl_lambda": 0.1 * e.state.epoch})
    MeanTerms(keys=("loss", "beta", "grl_lambda"), prefix="train_").attach(engine, "terms")
    History(tmp_path).attach(engine)
    engine.run([0], max_epochs=2)
    assert (tmp_path / "history.png").stat().st_size > 1000
    assert pd.read_csv(tmp_path / "history.csv")["beta"].tolist() == [2.0, 3.0]


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
