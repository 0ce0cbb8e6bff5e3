"""The optional dependencies (``pip install "cbvae[app|cloud|tracking|all]"``), imported in one place.

The core package trains, evaluates and decodes without them. ``require`` imports one through MONAI's
``optional_import``; a missing one is a ``MissingExtraError`` whose one line names the extra that installs it.
"""

from __future__ import annotations

import importlib
from typing import Any

from cbvae_ext.errors import CbvaeError

__all__ = ["EXTRAS", "MissingExtraError", "require"]

#: The distribution behind each optional top-level module, and the extra (pyproject.toml) that installs it.
EXTRAS: dict[str, tuple[str, str]] = {
    "streamlit": ("streamlit", "app"),
    "runpod": ("runpod", "cloud"),
    "wandb": ("wandb", "tracking"),
    "mlflow": ("mlflow", "tracking"),
    "tensorboard": ("tensorboard", "tracking"),
}


class MissingExtraError(CbvaeError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def _extra(module: str) -> tuple[str, str]:
    # torch ships torch.utils.tensorboard, which needs the tensorboard distribution
    top = "tensorboard" if module.startswith("torch.utils.tensorboard") else module.split(".")[0]
    if top not in EXTRAS:
        raise KeyError(f"{module} is not an optional dependency of cbvae (EXTRAS: {', '.join(EXTRAS)})")
    return EXTRAS[top]


def require(module: str, name: str = "", *, needed_by: str = "", instead: str = "", light: bool = False) -> Any:
    """Import an optional dependency, or fail with one line naming its extra.

    Args:
        module: the module, e.g. ``"streamlit"`` or ``"torch.utils.tensorboard"``.
        name: an attribute of ``module`` to return instead of the module (``"SummaryWriter"``).
        needed_by: what needs it, for the message (default: ``module``).
        instead: how to do without it, appended to the message (e.g. ``"or pass --use_mlflow false"``).
        light: import with ``importlib`` rather than MONAI's ``optional_import``, for the RunPod launcher and
            the pod's watchdog, which never import MONAI (and torch), and the app's first check: that costs
            seconds, ~20 s on a busy CPU.

    Raises:
        MissingExtraError: the module (or one it needs) cannot be imported.
    """
    package, extra = _extra(module)
    if light:
        try:
            found, ok = importlib.import_module(module), True
            found = getattr(found, name) if name else found
        except (ImportError, AttributeError):
            found, ok = None, False
    else:
        from monai.utils import optional_import

        found, ok = optional_import(module, name=name)
    if not ok:
        tail = f" ({instead})" if instead else ""
        raise MissingExtraError(
            f'{needed_by or module} needs {package}, which is not installed: pip install "cbvae[{extra}]"{tail}'
        )
    return found
