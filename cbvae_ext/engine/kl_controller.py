"""KL controller: raise β when the KL term becomes a negligible share of the loss above its floor (plan S2.2.2)."""

from __future__ import annotations

from typing import Any

from ignite.engine import Engine, Events

__all__ = ["SCALES", "KLController", "kl_ratio"]

#: Scales of the ratio the rule compares with its threshold.
SCALES = ("excess", "total")


def kl_ratio(kl: float, recon: float, floor: float, total: float, scale: str = "excess") -> float:
    """The KL share the rule reads.

    ``"excess"`` (default): ``KL / (recon - floor + KL)``, the KL share of the negative ELBO above its
    floor (the targets' summed entropy, which no model can go below: ≈ 941 nats/map on the 1k split).
    ``"total"``: ``KL / loss``, the literal ratio; with a reconstruction summed over ≈ 28.5k voxels it is
    ≈ 0.015 whatever the latent does, so the rule fires every ``patience`` epochs.
    """
    if scale == "total":
        return kl / total if total > 0 else float("inf")
    denom = recon - floor + kl
    return kl / denom if denom > 0 else float("inf")


class KLController:
    """If the KL share stays below ``threshold`` for ``patience`` consecutive epochs, multiply ``loss.beta`` by ``factor``.

    Reads the epoch means ``state.metrics[prefix + key]`` of ``kl``, ``recon``, ``floor`` and ``loss``
    (from ``MeanTerms``), so attach it after the metrics (MONAI attaches engine metrics before handlers).
    The share is ``kl_ratio(..., scale)``. After a raise the streak restarts. Each change is logged
    through ``engine.logger`` and appended to ``self.changes``; ``self.ratios`` keeps every epoch's share.

    Args:
        loss: object with a mutable ``beta`` attribute (``CBVAELoss``).
        threshold: the KL share below which an epoch counts as low.
        patience: consecutive low epochs that trigger a raise.
        factor: multiplier applied to β (> 1).
        cap: largest β allowed.
        scale: ``"excess"`` or ``"total"`` (see ``kl_ratio``).
        prefix: prefix of the metric names (``"train_"``).
        enabled: False keeps β fixed (the ratio is still recorded).

    Raises:
        ValueError: for ``factor <= 1``, ``patience < 1``, ``cap`` below the current β or an unknown scale.
    """

    def __init__(
        self,
        loss: Any,
        threshold: float = 0.05,
        patience: int = 3,
        factor: float = 1.5,
        cap: float = 8.0,
        scale: str = "excess",
        prefix: str = "train_",
        enabled: bool = True,
    ) -> None:
        if factor <= 1:
            raise ValueError(f"KLController factor must be > 1, got {factor}")
        if patience < 1:
            raise ValueError(f"KLController patience must be >= 1, got {patience}")
        if cap < loss.beta:
            raise ValueError(f"KLController cap {cap} is below the initial beta {loss.beta}")
        if scale not in SCALES:
            raise ValueError(f"KLController scale must be one of {', '.join(SCALES)}, got {scale!r}")
        self.loss = loss
        self.threshold = threshold
        self.patience = patience
        self.factor = factor
        self.cap = cap
        self.scale = scale
        self.prefix = prefix
        self.enabled = bool(enabled)
        self.streak = 0
        self.changes: list[dict[str, float]] = []
        self.ratios: list[float] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        metrics = engine.state.metrics
        p = self.prefix
        ratio = kl_ratio(
            metrics[p + "kl"],
            metrics.get(p + "recon", 0.0),
            metrics.get(p + "floor", 0.0),
            metrics[p + "loss"],
            self.scale,
        )
        self.ratios.append(float(ratio))
        if not self.enabled:
            return
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
        engine.logger.info(
            f"KL controller: KL share ({self.scale}) = {ratio:.4f} < {self.threshold} for {self.patience} epochs; "
            f"beta {old:g} -> {new:g} (epoch {engine.state.epoch})"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"beta": float(self.loss.beta), "streak": self.streak, "changes": list(self.changes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss.beta = float(state["beta"])
        self.streak = int(state["streak"])
        self.changes = list(state.get("changes", []))
