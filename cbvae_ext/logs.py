"""The package's one logger namespace (``cbvae_ext.*``, each module ``logging.getLogger(__name__)``) on the console.

Command-line entry points call ``log_to_console`` once, so INFO lines of every ``cbvae_ext`` module reach
stderr as plain lines; library callers keep Python's defaults (nothing is printed unless they configure it).
"""

from __future__ import annotations

import logging
import sys

__all__ = ["NAMESPACE", "log_to_console"]

#: The root of every logger in the package.
NAMESPACE = "cbvae_ext"


def log_to_console(level: int = logging.INFO) -> logging.Logger:
    """Send ``cbvae_ext.*`` records at ``level`` and above to stderr (one handler however often it is called)."""
    root = logging.getLogger(NAMESPACE)
    root.setLevel(level)
    if not any(isinstance(h, _ConsoleHandler) for h in root.handlers):
        root.addHandler(_ConsoleHandler())
        root.propagate = False  # a root handler configured elsewhere would print each line twice
    return root


class _ConsoleHandler(logging.StreamHandler):
    """Plain message lines on the current ``sys.stderr``."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("%(message)s"))
