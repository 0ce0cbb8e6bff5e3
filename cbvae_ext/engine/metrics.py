"""Epoch means of the per-term iteration outputs, as one ignite ``Metric``."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

__all__ = ["MeanTerms"]


class MeanTerms(Metric):
    """Average each scalar of ``engine.state.output`` over the epoch into ``state.metrics[prefix + key]``.

    NaN values (e.g. adversary accuracy on a batch without known years) are skipped per key. Under DDP
    the sums are all-reduced, so every rank sees the global means.

    Args:
        keys: output keys to average.
        prefix: prepended to each key in ``engine.state.metrics`` (``"train_"``, ``"val_"``).
        output_transform: maps ``engine.state.output`` to the dict of floats.
        device: where the accumulators live (the engine device under DDP with NCCL).
    """

    def __init__(
        self,
        keys: Sequence[str] = ("loss", "recon", "kl", "imp", "adv", "adv_acc"),
        prefix: str = "",
        output_transform: Callable[[Any], Any] = lambda x: x,
        device: str | Any = "cpu",
    ) -> None:
        self.keys = tuple(keys)
        self.prefix = prefix
        super().__init__(
            output_transform=output_transform, device=device, skip_unrolling=True, metrics_result_mode="flatten"
        )

    @reinit__is_reduced
    def reset(self) -> None:
        self._sums = torch.zeros(len(self.keys), dtype=torch.float64, device=self._device)
        self._counts = torch.zeros(len(self.keys), dtype=torch.float64, device=self._device)

    @reinit__is_reduced
    def update(self, output: Mapping[str, float]) -> None:
        for i, key in enumerate(self.keys):
            value = output.get(key)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            self._sums[i] += float(value)
            self._counts[i] += 1

    def iteration_completed(self, engine: Engine) -> None:
        # the whole output dict goes to update(); ignite's default expects a (y_pred, y) pair
        self.update(self._output_transform(engine.state.output))

    @sync_all_reduce("_sums:SUM", "_counts:SUM")
    def compute(self) -> dict[str, float]:
        return {
            self.prefix + key: (s / c if c > 0 else float("nan"))
            for key, s, c in zip(self.keys, self._sums.tolist(), self._counts.tolist(), strict=True)
        }
