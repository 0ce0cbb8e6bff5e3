"""KL controller: raise β when the KL term becomes a negligible share of the loss (posterior collapse guard)."""

from __future__ import annotations

import logging
from typing import Any

from ignite.engine import Engine, Events

__all__ = ["KLController"]


class KLController:
    """If ``KL / total loss < threshold`` for ``patience`` consecutive epochs, multiply ``loss.beta`` by ``factor``.

    Reads the epoch means ``state.metrics[kl_key]`` and ``state.metrics[loss_key]`` (from ``MeanTerms``),
    so attach it after the metrics (MONAI attaches engine metrics before handlers). After a raise the
    streak restarts. Each change is logged and appended to ``self.changes``.

    Args:
        loss: object with a mutable ``beta`` attribute (``CBVAELoss``).
        threshold: the KL share below which an epoch counts as low.
        patience: consecutive low epochs that trigger a raise.
        factor: multiplier applied to β (> 1).
        cap: largest β allowed.
        kl_key: metric holding the epoch mean KL (unweighted).
        loss_key: metric holding the epoch mean total loss.

    Raises:
        ValueError: for ``factor <= 1``, ``patience < 1`` or ``cap`` below the current β.
    """

    def __init__(
        self,
        loss: Any,
        threshold: float = 0.05,
        patience: int = 3,
        factor: float = 1.5,
        cap: float = 8.0,
        kl_key: str = "train_kl",
        loss_key: str = "train_loss",
    ) -> None:
        if factor <= 1:
            raise ValueError(f"KLController factor must be > 1, got {factor}")
        if patience < 1:
            raise ValueError(f"KLController patience must be >= 1, got {patience}")
        if cap < loss.beta:
            raise ValueError(f"KLController cap {cap} is below the initial beta {loss.beta}")
        self.loss = loss
        self.threshold = threshold
        self.patience = patience
        self.factor = factor
        self.cap = cap
        self.kl_key = kl_key
        self.loss_key = loss_key
        self.streak = 0
        self.changes: list[dict[str, float]] = []
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        kl, total = engine.state.metrics[self.kl_key], engine.state.metrics[self.loss_key]
        ratio = kl / total if total > 0 else float("inf")
        self.streak = self.streak + 1 if ratio < self.threshold else 0
        if self.streak < self.patience:
            return
        self.streak = 0
        old = self.loss.beta
        new = min(old * self.factor, self.cap)
        if new == old:
            return
        self.loss.beta = new
        change = {"epoch": engine.state.epoch, "ratio": ratio, "beta_old": old, "beta_new": new}
        self.changes.append(change)
        self.logger.info(
            f"KL controller: KL/loss = {ratio:.4f} < {self.threshold} for {self.patience} epochs; "
            f"beta {old:g} -> {new:g} (epoch {engine.state.epoch})"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"beta": float(self.loss.beta), "streak": self.streak, "changes": list(self.changes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss.beta = float(state["beta"])
        self.streak = int(state["streak"])
        self.changes = list(state.get("changes", []))
