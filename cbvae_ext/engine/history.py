"""Per-epoch training history: ``history.csv`` / ``history.json`` and a PNG of β and λ over training."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from ignite.engine import Engine, Events

from cbvae_ext.run_folder import replace_atomically, write_json_atomically

__all__ = ["History", "plot_schedules"]


def plot_schedules(history: pd.DataFrame, path: str | Path) -> Path:
    """Save a PNG of β (left axis) and GRL λ (right axis) per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(history["epoch"], history["beta"], "o-", color="tab:blue", label="β (KL weight)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("β", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(history["epoch"], history["grl_lambda"], "s--", color="tab:red", label="λ (GRL, epoch mean)")
    ax2.set_ylabel("λ", color="tab:red")
    fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88), fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


class History:
    """Append one row per epoch with the train and validation metrics, β, λ and the learning rate.

    Columns: ``epoch``, ``loss``, ``recon``, ``kl``, ``imp``, ``adv``, ``adv_acc``, ``beta`` (used
    during the epoch), ``grl_lambda`` (epoch mean), ``grad_norm``, ``lr`` (used during the epoch), ``val_*`` (from
    the evaluator). On a resumed run the rows after the restored epoch are dropped first, so the file
    always describes one continuous training.

    Args:
        output_dir: run folder; writes ``history.csv``, ``history.json`` and ``history.png``.
        evaluator: engine whose ``state.metrics`` hold the ``val_*`` values (run before this handler).
        train_prefix: prefix of the trainer's metrics, stripped in the columns.
        plot: also save the β/λ PNG.
        name: logger name; ``None`` logs through the engine's logger (muted on ranks > 0 by the overlay).
    """

    def __init__(
        self,
        output_dir: str | Path,
        evaluator: Engine | None = None,
        train_prefix: str = "train_",
        plot: bool = True,
        name: str | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.evaluator = evaluator
        self.train_prefix = train_prefix
        self.plot = plot
        self.rows: list[dict[str, float]] = []
        self._first = True
        self._name = name
        self.logger = logging.getLogger(name)

    @property
    def csv_path(self) -> Path:
        return self.output_dir / "history.csv"

    def attach(self, engine: Engine) -> None:
        if self._name is None:
            self.logger = engine.logger
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_STARTED, self.first_epoch_started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def started(self, engine: Engine) -> None:
        self._first = True

    def first_epoch_started(self, engine: Engine) -> None:
        # at the first epoch any checkpoint has been restored, whatever order STARTED handlers ran in
        if not self._first:
            return
        self._first = False
        done = engine.state.epoch - 1
        self.rows = []
        if done > 0 and self.csv_path.is_file():  # resumed: keep what the checkpoint covers
            old = pd.read_csv(self.csv_path)
            self.rows = old[old["epoch"] <= done].to_dict("records")
            self.logger.info(f"resuming history after epoch {done} ({len(self.rows)} rows kept)")

    def epoch_completed(self, engine: Engine) -> None:
        row: dict[str, float] = {"epoch": engine.state.epoch}
        for key, value in engine.state.metrics.items():
            if key.startswith(self.train_prefix):
                row[key[len(self.train_prefix) :]] = float(value)
        if self.evaluator is not None:
            row.update({k: float(v) for k, v in self.evaluator.state.metrics.items() if _is_number(v)})
        self.rows.append(row)
        self.write()

    def write(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        frame = pd.DataFrame(self.rows)
        # atomic: a kill mid-write must not leave a truncated history for the resumed run to read
        replace_atomically(self.csv_path, lambda tmp: frame.to_csv(tmp, index=False))
        write_json_atomically(
            self.output_dir / "history.json",
            [{k: (None if _is_nan(v) else v) for k, v in r.items()} for r in self.rows],
        )
        if self.plot and {"beta", "grl_lambda"} <= set(frame.columns):
            plot_schedules(frame, self.output_dir / "history.png")

    @staticmethod
    def read(output_dir: str | Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """Load a run's history (optionally a subset of columns)."""
        frame = pd.read_csv(Path(output_dir) / "history.csv")
        return frame if columns is None else frame[list(columns)]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)
