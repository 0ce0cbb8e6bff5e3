"""The one exception type of the dataset builder and loader."""

from __future__ import annotations

from cbvae_ext.errors import CbvaeError

__all__ = ["DataError"]


class DataError(CbvaeError, ValueError):
    """Bad input or a bad dataset folder; the message is one line naming the file/field and the fix."""
