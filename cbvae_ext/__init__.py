"""cbvae_ext: the custom code of the C-β-VAE MONAI bundle (data, networks, engine, evaluation, export, app)."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.2.0"
