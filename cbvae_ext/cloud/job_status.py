"""The pipeline's ``status.json``: what ``scripts/run_main.sh`` is doing, read by the launcher over SSH.

One JSON object ``{"state", "step", "message", "updated"}`` (``state``: ``running``, ``done`` or
``failed``), replaced atomically so a reader never sees half a file. The shell scripts write it with
``python -m cbvae_ext.cloud.job_status OUT STATE STEP [MESSAGE...]``; ``transfer.read_status`` reads it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

__all__ = ["STATES", "STATUS_FILE", "main", "write_status"]

STATUS_FILE = "status.json"
STATES = ("running", "done", "failed")


def write_status(out: str | Path, state: str, step: str, message: str = "") -> Path:
    """Replace ``out/status.json`` atomically and return its path.

    Raises:
        ValueError: ``state`` is not one of :data:`STATES`.
    """
    if state not in STATES:
        raise ValueError(f"status state must be one of {', '.join(STATES)}, got {state!r}")
    path = Path(out) / STATUS_FILE
    tmp = path.with_name(f".{STATUS_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"state": state, "step": step, "message": message, "updated": time.time()}))
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3:
        print("usage: python -m cbvae_ext.cloud.job_status OUT STATE STEP [MESSAGE...]", file=sys.stderr)
        return 2
    write_status(args[0], args[1], args[2], " ".join(args[3:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
