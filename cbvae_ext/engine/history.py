"""Per-epoch training history: ``history.csv`` / ``history.json`` and a PNG of the training curves."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from ignite.engine import Engine, Events

from cbvae_ext.run_folder import replace_atomically, write_json_atomically, write_png_atomically

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["History", "plot_training_curves", "training_curves_figure"]


@dataclass(frozen=True)
class _Curve:
    """One history column drawn as a line (train: solid with dots, validation: dashed with squares)."""

    column: str
    label: str
    color: str

    @property
    def style(self) -> str:
        return "s--" if self.column.startswith("val_") else "o-"


@dataclass(frozen=True)
class _Panel:
    """One row of the figure: curves on the left axis and, when their scales differ, on a twin right axis."""

    left_label: str
    left: tuple[_Curve, ...]
    right_label: str = ""
    right: tuple[_Curve, ...] = ()


# the columns History writes (see its docstring); validation runs at β = 1 without the adversary
_PANELS = (
    _Panel(
        "loss",
        (
            _Curve("loss", "train loss (β-weighted objective)", "tab:blue"),
            _Curve("val_loss", "val loss (−ELBO at β = 1, + imputation)", "tab:orange"),
        ),
    ),
    _Panel(
        "reconstruction (BCE)",
        (
            _Curve("recon", "train recon", "tab:green"),
            _Curve("val_recon", "val recon", "tab:green"),
            _Curve("floor", "recon floor (entropy of the maps)", "0.5"),
        ),
        "KL (nats)",
        (_Curve("kl", "train KL", "tab:purple"), _Curve("val_kl", "val KL", "tab:purple")),
    ),
    _Panel(
        "β",
        (_Curve("beta", "β (KL weight)", "tab:blue"),),
        "λ",
        (_Curve("grl_lambda", "λ (GRL, epoch mean)", "tab:red"),),
    ),
    _Panel(
        "adversary accuracy (year bin)",
        (
            _Curve("adv_acc", "train adversary acc.", "tab:brown"),
            _Curve("val_adv_acc", "val adversary acc.", "tab:brown"),
        ),
    ),
)


def _present(history: pd.DataFrame, curves: Sequence[_Curve]) -> list[_Curve]:
    """The curves whose column exists with a finite value (a run without an adversary writes NaN accuracies)."""
    return [
        c for c in curves if c.column in history and pd.to_numeric(history[c.column], errors="coerce").notna().any()
    ]


def _draw(ax: Axes, history: pd.DataFrame, curves: Sequence[_Curve], label: str) -> list[Any]:
    for c in curves:
        ax.plot(history["epoch"], history[c.column], c.style, color=c.color, ms=4, label=c.label)
    ax.set_ylabel(label, color=curves[0].color if len({c.color for c in curves}) == 1 else "k")
    return ax.get_lines()


def training_curves_figure(history: pd.DataFrame) -> Figure | None:
    """Build the training-curve figure: one panel per group of curves present in ``history``.

    Panels (top to bottom, each skipped when none of its columns holds a value): train and validation loss;
    reconstruction (left axis, with the maps' entropy floor) and KL (right axis); β (left) and GRL λ
    (right); the adversary's accuracy.

    Args:
        history: one row per epoch with an ``epoch`` column and any of the columns ``History`` writes.

    Returns:
        The figure (not attached to pyplot, so nothing needs closing), or ``None`` when no panel has data.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = [(p, _present(history, p.left), _present(history, p.right)) for p in _PANELS]
    panels = [(p, left, right) for p, left, right in panels if left or right]
    if "epoch" not in history or not panels:
        return None
    fig = Figure(figsize=(7.5, 0.6 + 2.4 * len(panels)), dpi=100, layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (panel, left, right) in zip(axes, panels, strict=True):
        lines = _draw(ax, history, left, panel.left_label) if left else []
        if right:
            # only β/λ and recon/KL share a panel: their scales differ by orders of magnitude
            lines += _draw(ax.twinx() if left else ax, history, right, panel.right_label)
        ax.legend(lines, [ln.get_label() for ln in lines], loc="lower left", bbox_to_anchor=(0, 1), ncol=3,
                  fontsize=7, frameon=False, borderaxespad=0.2)  # fmt: skip
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("epoch")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    # half an epoch either side: one epoch still gets an integer tick instead of a ±5 % float range
    axes[-1].set_xlim(history["epoch"].min() - 0.5, history["epoch"].max() + 0.5)
    return fig


def plot_training_curves(history: pd.DataFrame, path: str | Path) -> Path | None:
    """Save ``training_curves_figure(history)`` as a PNG; returns its path, or ``None`` when nothing was drawn."""
    fig = training_curves_figure(history)
    if fig is None:
        return None
    return write_png_atomically(fig, path)


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
        plot: also save ``history.png`` (``plot_training_curves``).
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
        if self.plot:
            plot_training_curves(frame, self.output_dir / "history.png")

    @staticmethod
    def read(output_dir: str | Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """Load a run's history (optionally a subset of columns)."""
        frame = pd.read_csv(Path(output_dir) / "history.csv")
        return frame if columns is None else frame[list(columns)]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)
