"""Experiment tracking: W&B through ignite's ``WandBLogger``, the MLflow store location for MONAI's ``MLFlowHandler``,
and the hyper-parameters for TensorBoard (``TensorBoardHParams``). Every tracker records the same
hyper-parameters: ``TrainKnobs.hyper_params()``, every training knob. The trackers are the ``tracking`` extra
(``check_trackers`` refuses a switched-on tracker that is not installed, before the run writes anything).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

from cbvae_ext.extras import require

__all__ = ["TensorBoardHParams", "WandBTracker", "check_trackers", "mlflow_uri", "wandb_mode"]

#: Each tracker switch of train.yaml and the module it needs.
_TRACKER_MODULES = {"use_mlflow": "mlflow", "use_wandb": "wandb", "use_tensorboard": "torch.utils.tensorboard"}


def _require_tracker(switch: str, name: str = "") -> Any:
    return require(_TRACKER_MODULES[switch], name, needed_by=f"--{switch} true", instead=f"or pass --{switch} false")


def check_trackers(**switches: bool) -> None:
    """Import every switched-on tracker (``use_mlflow=True, ...``) once, so a missing one is one line at the start.

    Raises:
        MissingExtraError: a tracker is on but its package (the ``tracking`` extra) is not installed.
    """
    for switch, on in switches.items():
        if on:
            _require_tracker(switch)


def mlflow_uri(output_dir: str | Path) -> str:
    """Embedded SQLite store ``sqlite:///<output_dir>/mlflow.db`` (``MLFLOW_TRACKING_URI`` still wins in MONAI)."""
    path = Path(output_dir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


def wandb_mode() -> str:
    """``"offline"`` unless ``WANDB_API_KEY`` is set (then ``WANDB_MODE`` or ``"online"``)."""
    if not os.environ.get("WANDB_API_KEY"):
        return "offline"
    return os.environ.get("WANDB_MODE", "online")


class WandBTracker:
    """Log the trainer's per-iteration scalars, epoch metrics, lr and the evaluator's metrics to W&B.

    Every record uses the trainer's iteration as the W&B step so that steps stay monotonic.
    The run is created on ``attach`` (offline files under ``<output_dir>/wandb`` without an API key)
    and finished when training completes.

    Args:
        output_dir: run folder; W&B writes under ``<output_dir>/wandb``.
        project: W&B project name.
        run_name: W&B run name (default: W&B's).
        config: hyper-parameters recorded with the run.
        evaluator: engine whose epoch metrics (``val_*``) are logged too.
        optimizer: its ``lr`` is logged.
        log_every: log the iteration scalars every this many iterations.
    """

    def __init__(
        self,
        output_dir: str | Path,
        project: str = "cbvae",
        run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
        evaluator: Engine | None = None,
        optimizer: Any | None = None,
        log_every: int = 10,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.project = project
        self.run_name = run_name
        self.config = dict(config or {})
        self.evaluator = evaluator
        self.optimizer = optimizer
        self.log_every = max(int(log_every), 1)
        self.logger: Any = None

    def attach(self, engine: Engine) -> None:
        _require_tracker("use_wandb")  # ignite's WandBLogger imports wandb itself, with a multi-line error
        from ignite.handlers.wandb_logger import WandBLogger

        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.logger = WandBLogger(
            project=self.project,
            name=self.run_name,
            dir=str(self.output_dir),
            mode=wandb_mode(),
            config=self.config,
        )

        def step(*_: Any) -> int:
            return engine.state.iteration

        every = Events.ITERATION_COMPLETED(every=self.log_every)
        self.logger.attach_output_handler(
            engine, every, tag="train_iter", output_transform=lambda out: out, global_step_transform=step
        )
        self.logger.attach_output_handler(
            engine, Events.EPOCH_COMPLETED, tag="epoch", metric_names="all", global_step_transform=step
        )
        if self.optimizer is not None:
            self.logger.attach_opt_params_handler(engine, every, optimizer=self.optimizer, param_name="lr")
        if self.evaluator is not None:
            self.logger.attach_output_handler(
                self.evaluator, Events.EPOCH_COMPLETED, tag="epoch", metric_names="all", global_step_transform=step
            )
        engine.add_event_handler(Events.COMPLETED, lambda _: self.logger.close())


class TensorBoardHParams:
    """Write the run's hyper-parameters to TensorBoard's HParams plugin, in ``log_dir``, when training starts.

    MONAI's ``TensorBoardStatsHandler`` records scalars only. Lists and mappings are written as text (the
    plugin takes numbers, bools and text).

    Args:
        log_dir: the TensorBoard folder (the one ``TensorBoardStatsHandler`` writes).
        hparams: the hyper-parameters (``TrainKnobs.hyper_params()``).
    """

    def __init__(self, log_dir: str | Path, hparams: Mapping[str, Any]) -> None:
        self.log_dir = Path(log_dir)
        self.hparams = {k: v if isinstance(v, bool | int | float | str) else str(v) for k, v in hparams.items()}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._write)

    def _write(self, _: Engine) -> None:
        summary_writer = _require_tracker("use_tensorboard", "SummaryWriter")
        hparams = require("torch.utils.tensorboard.summary", "hparams")

        # the plugin's experiment, session start and session end records, in the scalars' folder
        with summary_writer(log_dir=str(self.log_dir)) as writer:
            for summary in hparams(self.hparams, metric_dict={}):
                writer.file_writer.add_summary(summary)
