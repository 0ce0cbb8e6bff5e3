"""Gradient-reversal strength λ over training (the DANN ramp)."""

from __future__ import annotations

import logging
import math
from typing import Any

from ignite.engine import Engine, Events
from torch import nn

from cbvae_ext.engine.step import unwrap
from cbvae_ext.errors import CbvaeError

__all__ = ["GRLSchedule", "GRLScheduleError", "dann_lambda"]


class GRLScheduleError(CbvaeError, ValueError):
    """A ramp parameter the schedule cannot use."""


def dann_lambda(progress: float, gamma: float = 10.0, lambda_max: float = 1.0) -> float:
    """Ganin et al. (2016) ramp: ``λ = λ_max · (2 / (1 + exp(-γ·p)) - 1)`` for training progress ``p`` in [0, 1]."""
    p = min(max(progress, 0.0), 1.0)
    return lambda_max * (2.0 / (1.0 + math.exp(-gamma * p)) - 1.0)


class GRLSchedule:
    """Set ``network.grl.lambda_`` before every iteration from the progress ``(iteration - 1) / total``.

    λ is a pure function of the iteration counter, so a resumed run continues the ramp exactly; the
    state dict only records it for inspection. A model without a ``grl`` (the baseline) is left alone.

    Args:
        network: the model (DDP / compiled wrappers are unwrapped).
        gamma: steepness γ of the ramp.
        lambda_max: the plateau λ.
        log_every: log λ at INFO every this many iterations (0 = never).
        name: logger name; ``None`` (default) logs through the engine's logger, as MONAI handlers do, so
            the multi-GPU overlay's rank muting (``trainer.logger.setLevel``) reaches it.

    Raises:
        GRLScheduleError: a negative ``gamma`` or ``lambda_max`` (or not finite).
    """

    def __init__(
        self,
        network: nn.Module,
        gamma: float = 10.0,
        lambda_max: float = 1.0,
        log_every: int = 0,
        name: str | None = None,
    ) -> None:
        if not (math.isfinite(gamma) and math.isfinite(lambda_max) and gamma >= 0 and lambda_max >= 0):
            raise GRLScheduleError(
                f"grl_gamma and grl_lambda_max must be finite and >= 0, got {gamma}, {lambda_max}; fix the override"
            )
        self.network = network
        self.gamma = gamma
        self.lambda_max = lambda_max
        self.log_every = log_every
        self.lambda_ = 0.0
        self._name = name
        self.logger = logging.getLogger(name)

    def attach(self, engine: Engine) -> None:
        if self._name is None:
            self.logger = engine.logger
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        total = max(engine.state.max_epochs * (engine.state.epoch_length or 1), 1)
        self.lambda_ = dann_lambda((engine.state.iteration - 1) / total, self.gamma, self.lambda_max)
        grl = getattr(unwrap(self.network), "grl", None)
        if grl is not None:
            grl.lambda_ = self.lambda_
        if self.log_every and engine.state.iteration % self.log_every == 0:
            self.logger.info(f"GRL lambda = {self.lambda_:.4f} at iteration {engine.state.iteration}")

    def state_dict(self) -> dict[str, Any]:
        return {"lambda_": self.lambda_}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lambda_ = float(state["lambda_"])
