"""Find the checkpoint a resumed run starts from."""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["last_checkpoint"]

_EPOCH = re.compile(r"_epoch=(\d+)\.pt$")


def last_checkpoint(checkpoint_dir: str | Path, enabled: bool = True) -> str | None:
    """Path of the newest ``*_epoch=N.pt`` (MONAI ``CheckpointSaver`` interval file), or ``None``.

    Args:
        checkpoint_dir: the run's ``checkpoints/`` folder (may not exist yet).
        enabled: ``False`` (resume switched off) always gives ``None``.
    """
    folder = Path(checkpoint_dir)
    if not enabled or not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.glob("*.pt") if (m := _EPOCH.search(p.name))]
    return str(max(found)[1]) if found else None
