"""The page's widget keys, named in one place: the page, its callbacks and the tests build them here
instead of formatting and parsing strings of their own."""

from __future__ import annotations

__all__ = ["cut", "field_unknown", "field_value", "latent", "topic", "topic_table"]


def latent(d: int) -> str:
    """Slider of latent dimension ``d``."""
    return f"z{d}"


def topic(t: int) -> str:
    """Slider of topic ``t``."""
    return f"topic_{t}"


def topic_table(version: int) -> str:
    """The table of the other topics; a new version makes it show new weights."""
    return f"topic_table_{version}"


def field_unknown(name: str) -> str:
    """ "unknown" tick box of a continuous condition."""
    return f"{name}_unknown"


def field_value(name: str) -> str:
    """Slider of a continuous condition."""
    return f"{name}_value"


def cut(axis: str) -> str:
    """Slider of the ``x``, ``y`` or ``z`` cut."""
    return f"cut_{axis}"
