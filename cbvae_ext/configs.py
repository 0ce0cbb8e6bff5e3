"""Where the bundle configs are: ``config_dir()``, the one lookup (``python -m cbvae_ext.configs`` prints it).

The configs ship as package data: pyproject.toml maps the package ``cbvae_ext.bundle_configs`` to the
checkout's ``bundle/configs``, so an installed wheel holds them in ``cbvae_ext/bundle_configs/`` and a checkout
(or an editable install) reads ``bundle/configs`` itself, the folder the README's commands name. Point the
bundle at the installed ones from anywhere::

    python -m monai.bundle run training --config_file "$(python -m cbvae_ext.configs)/train.yaml" ...
"""

from __future__ import annotations

import functools
from pathlib import Path

from cbvae_ext.errors import CbvaeError

__all__ = ["ConfigDirError", "config_dir"]

_PACKAGE = Path(__file__).resolve().parent
#: the installed package data, then the source folder pyproject.toml maps it from (a checkout)
_CANDIDATES = (_PACKAGE / "bundle_configs", _PACKAGE.parent / "bundle" / "configs")


class ConfigDirError(CbvaeError, FileNotFoundError):
    """Neither the installed configs nor a checkout's ``bundle/configs`` is there."""


@functools.cache
def config_dir() -> Path:
    """The folder of the bundle configs (``train.yaml``, ``evaluate.yaml``, ``inference.yaml``, overlays).

    Raises:
        ConfigDirError: no folder with a ``train.yaml`` (a broken install).
    """
    for candidate in _CANDIDATES:
        if (candidate / "train.yaml").is_file():
            return candidate
    raise ConfigDirError(
        f"no bundle configs in {_CANDIDATES[0]} (installed) or {_CANDIDATES[1]} (checkout); "
        'reinstall cbvae (pip install "cbvae[all]") or restore bundle/configs from git'
    )


if __name__ == "__main__":
    print(config_dir())
