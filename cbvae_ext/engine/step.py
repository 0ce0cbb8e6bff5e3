"""Iteration functions for MONAI's ``SupervisedTrainer`` / ``SupervisedEvaluator`` (``iteration_update``).

MONAI's default iteration assumes ``loss(pred, label)``; the C-β-VAE needs the metadata and returns a
dict of terms, so these callables replace it while the engines, handlers and events stay MONAI's.
``engine.state.output`` is a flat dict of Python floats (set ``decollate=False`` on the engines).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from cbvae_ext.networks import unwrap

__all__ = ["BATCH_KEYS", "EvalStep", "TrainStep", "grl_lambda", "to_device", "unwrap"]

#: Tensors of a dataset batch the model and the loss read.
BATCH_KEYS = ("image", "meta", "meta_mask", "year_bin")


def grl_lambda(network: nn.Module) -> float:
    """Current gradient-reversal strength (0 for a model without an adversary)."""
    grl = getattr(unwrap(network), "grl", None)
    return float(getattr(grl, "lambda_", 0.0)) if grl is not None else 0.0


def to_device(batch: Mapping[str, Any], device: torch.device, channels_last: bool = False) -> dict[str, Any]:
    """Move the model's tensors to ``device`` (non-blocking when pinned); other keys pass through."""
    moved = dict(batch)
    for key in BATCH_KEYS:
        value = torch.as_tensor(batch[key])
        moved[key] = value.to(device, non_blocking=True)
    moved["image"] = moved["image"].float()  # resident splits are stored in float16
    if channels_last:
        moved["image"] = moved["image"].contiguous(memory_format=torch.channels_last_3d)
    return moved


def _autocast(device: torch.device, dtype: str | None):
    if not dtype:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def _scalars(terms: Mapping[str, torch.Tensor]) -> dict[str, float]:
    # one host sync per iteration for all terms together
    values = torch.stack([t.detach().float() for t in terms.values()]).cpu().tolist()
    return dict(zip(terms.keys(), values, strict=True))


class _Step:
    def __init__(self, autocast_dtype: str | None = None, channels_last: bool = False, loss: Any = None) -> None:
        if autocast_dtype and not isinstance(getattr(torch, autocast_dtype, None), torch.dtype):
            raise ValueError(f"autocast_dtype must name a torch dtype such as 'bfloat16', got {autocast_dtype!r}")
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last
        self.loss = loss

    def _forward(
        self, engine: Any, batchdata: Mapping[str, Any], sample: bool | None = None, **loss_kwargs: Any
    ) -> dict[str, torch.Tensor]:
        batch = to_device(batchdata, engine.state.device, self.channels_last)
        with _autocast(engine.state.device, self.autocast_dtype):
            out = engine.network(batch["image"], batch["meta"], batch["meta_mask"], sample=sample)
        loss = self.loss if self.loss is not None else engine.loss_function
        return loss(out, batch, **loss_kwargs)


class TrainStep(_Step):
    """One optimisation step: forward, loss terms, backward, gradient clipping, optimizer step.

    Args:
        grad_clip: max global gradient norm (``None`` or 0 disables clipping).
        autocast_dtype: e.g. ``"bfloat16"`` for bf16 autocast (GPU preset); ``None`` for full precision.
        channels_last: feed the maps in ``channels_last_3d`` memory format.

    Returns (per call):
        ``{"loss", "recon", "kl", "imp", "adv", "adv_acc", "grad_norm", "beta", "grl_lambda", "lr"}`` as floats.
    """

    def __init__(
        self, grad_clip: float | None = 1.0, autocast_dtype: str | None = None, channels_last: bool = False
    ) -> None:
        super().__init__(autocast_dtype, channels_last)
        self.grad_clip = grad_clip

    def __call__(self, engine: Any, batchdata: Mapping[str, Any]) -> dict[str, float]:
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        terms = self._forward(engine, batchdata)
        if not torch.isfinite(terms["loss"]):
            raise FloatingPointError(f"non-finite training loss at iteration {engine.state.iteration}; lower lr")
        terms["loss"].backward()
        max_norm = self.grad_clip if self.grad_clip else math.inf
        terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(engine.network.parameters(), max_norm)
        engine.optimizer.step()
        output = _scalars(terms)
        output["beta"] = float(engine.loss_function.beta)
        output["grl_lambda"] = grl_lambda(engine.network)
        output["lr"] = float(engine.optimizer.param_groups[0]["lr"])
        return output


class EvalStep(_Step):
    """One validation step: the objective at β = 1 without the adversary (the plain ELBO + imputation).

    Fixing β makes the validation loss comparable across epochs while the KL controller changes β.

    Args:
        loss: the ``CBVAELoss`` (MONAI evaluators carry no loss function).
        autocast_dtype: as for ``TrainStep``.
        channels_last: as for ``TrainStep``.
    """

    def __init__(self, loss: Any, autocast_dtype: str | None = None, channels_last: bool = False) -> None:
        super().__init__(autocast_dtype, channels_last, loss)

    def __call__(self, engine: Any, batchdata: Mapping[str, Any]) -> dict[str, float]:
        engine.network.eval()
        with torch.no_grad():
            # z drawn from q(z | x, m), not z = mu: the one-sample ELBO, a bound on log p(x | m)
            terms = self._forward(engine, batchdata, sample=True, beta=1.0, adversary=False)
        return _scalars(terms)
