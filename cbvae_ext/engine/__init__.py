"""Training engine pieces for the bundle: loss, iteration steps, handlers, tracking and run glue.

Everything here is reached from ``bundle/configs/*.yaml`` through ``_target_`` or ``$`` expressions.
"""

from __future__ import annotations

from cbvae_ext.engine.grl_schedule import GRLSchedule, dann_lambda
from cbvae_ext.engine.history import History
from cbvae_ext.engine.kl_controller import KLController
from cbvae_ext.engine.losses import CBVAELoss
from cbvae_ext.engine.metrics import MeanTerms
from cbvae_ext.engine.step import EvalStep, TrainStep

__all__ = [
    "CBVAELoss",
    "EvalStep",
    "GRLSchedule",
    "History",
    "KLController",
    "MeanTerms",
    "TrainStep",
    "dann_lambda",
]
