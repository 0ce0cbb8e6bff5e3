"""The one exception type of the dataset builder and loader."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad input or a bad dataset folder; the message is one line naming the file/field and the fix."""
