"""The package's one logger namespace (``cbvae_ext.*``, each module ``logging.getLogger(__name__)``) on the console.

Command-line entry points run inside ``log_to_console``, so INFO lines of every ``cbvae_ext`` module reach
stderr as plain lines while they run; afterwards (and for library callers) Python's defaults hold.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

__all__ = ["NAMESPACE", "log_to_console"]

#: The root of every logger in the package.
NAMESPACE = "cbvae_ext"


@contextlib.contextmanager
def log_to_console(level: int = logging.INFO) -> Iterator[logging.Logger]:
    """While the block runs, send ``cbvae_ext.*`` records at ``level`` and above to stderr as plain lines.

    The handler and level are removed afterwards, so an entry point called in-process (tests, notebooks)
    leaves the caller's logging as it was.
    """
    root = logging.getLogger(NAMESPACE)
    handler, saved = _ConsoleHandler(), (root.level, root.propagate)
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False  # a root handler configured elsewhere would print each line twice
    try:
        yield root
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        root.propagate = saved[1]


class _ConsoleHandler(logging.StreamHandler):
    """Plain message lines on ``sys.stderr`` as it is when a record is written (not when the handler was made:
    a replaced, since closed stream would make every later line a logging error)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the current sys.stderr is used instead
        pass
