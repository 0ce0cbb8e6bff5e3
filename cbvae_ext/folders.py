"""Folders written as a set: built in a temporary sibling, then put in place by renames."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["replace_folder"]


def replace_folder(tmp: str | Path, out: str | Path) -> None:
    """Put the finished folder ``tmp`` at ``out`` (same file system).

    An existing ``out`` is renamed to ``.OUT.old-PID`` first and removed only after ``tmp`` took its place,
    so a reader sees the old folder or the new one, never a mix; a kill in between leaves the old folder
    beside the new one under a name the builder's clean-up knows.
    """
    tmp, out = Path(tmp), Path(out)
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
