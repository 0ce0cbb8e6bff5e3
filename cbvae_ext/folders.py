"""Written output: folders put in place as a set, values made JSON-safe."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["json_safe", "replace_folder"]


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


def json_safe(obj: Any) -> Any:
    """``obj`` with numpy scalars and arrays as Python values, paths as strings and every NaN or infinity as
    None (JSON null), so ``json.dumps(..., allow_nan=False)`` accepts it."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj
