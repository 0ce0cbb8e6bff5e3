"""Checkpoints a killed run can resume from, and the checks before it resumes.

- ``AtomicCheckpointSaver``: MONAI's ``CheckpointSaver`` whose files are written through a temporary
  file and renamed, and whose superseded files are deleted only after the new one is complete, so a kill
  at any moment leaves the last good checkpoint (MONAI writes in place, after deleting the old one). It
  also carries the best key-metric value in its state, so a resumed run keeps the best ``model.pt``.
- ``RunFingerprint``: the run's ``network_config`` (architecture, model, dataset checksum) saved with
  every checkpoint.
- ``resume_checkpoint``: the newest readable checkpoint (a damaged one is skipped with a warning),
  refused with a one-line error when it was made for another dataset build, model or architecture.
- ``claim_output_dir``: the run folder's lock (a second training into it is refused in one line), the
  temporary files a killed run left removed, and with ``--resume false`` the previous run's
  ``checkpoints/`` archived, so that a later plain rerun cannot resume a run it did not make.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointSaver

from cbvae_ext.engine.bundle_glue import exit_on_error, flag
from cbvae_ext.errors import CbvaeError

__all__ = [
    "LOCK_FILE",
    "AtomicCheckpointSaver",
    "ResumeError",
    "RunFingerprint",
    "checkpoints",
    "claim_output_dir",
    "last_checkpoint",
    "resume_checkpoint",
]

logger = logging.getLogger(__name__)

_EPOCH = re.compile(r"_epoch=(\d+)\.pt$")
#: The run folder's lock file: ``fcntl.flock`` held by the training that writes the folder, released on exit.
LOCK_FILE = ".training.lock"
#: Temporary files of an interrupted atomic write: ignite's ``DiskSaver`` (``tmpXXXXXXXX``, ``tempfile``'s
#: names) and ``run_folder.replace_atomically`` (``.NAME.XXXXXXXX.tmp``).
_TEMPORARY = re.compile(r"^(tmp[a-z0-9_]{8}|\..+\.[a-z0-9_]{8}\.tmp)$")
#: Open lock files, by run folder: kept for the life of the process (closing one would release it).
_LOCKS: dict[str, Any] = {}

#: ``network_config`` keys that may differ on resume (none today: every key describes the model or its data).
_FREE_KEYS: frozenset[str] = frozenset()


class ResumeError(CbvaeError, ValueError):
    """A checkpoint that cannot be resumed by this command."""


def checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """The ``*_epoch=N.pt`` files of a folder (MONAI/ignite interval names), newest epoch first."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.glob("*.pt") if (m := _EPOCH.search(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def last_checkpoint(checkpoint_dir: str | Path, enabled: bool = True) -> str | None:
    """Path of the newest ``*_epoch=N.pt`` by name (not opened), or ``None``.

    Args:
        checkpoint_dir: the run's ``checkpoints/`` folder (may not exist yet).
        enabled: ``False`` (resume switched off) always gives ``None``.
    """
    found = checkpoints(checkpoint_dir) if enabled else []
    return str(found[0]) if found else None


def _canonical(config: Mapping[str, Any]) -> dict[str, Any]:
    # JSON round trip: tuples become lists, numpy scalars fail loudly here rather than at comparison
    return {k: v for k, v in json.loads(json.dumps(dict(config), sort_keys=True)).items() if k not in _FREE_KEYS}


def _short(value: Any) -> str:
    text = repr(value)
    return text[:13] + "…'" if isinstance(value, str) and len(value) > 24 else text[:80]


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [
        f"{k} {_short(saved.get(k, '(unset)'))} -> {_short(current.get(k, '(unset)'))}"
        for k in keys
        if saved.get(k) != current.get(k)
    ]


class RunFingerprint:
    """What a checkpoint was trained for: the run's ``network_config`` (model, architecture, dataset checksum).

    Saved in every checkpoint (``state_dict``); ``load_state_dict`` refuses a different one, the last
    guard if a checkpoint reaches the trainer without ``resume_checkpoint``.

    Args:
        network_config: the run's ``network_config`` (``bundle_glue.network_config``).
    """

    def __init__(self, network_config: Mapping[str, Any]) -> None:
        self.config = _canonical(network_config)

    def state_dict(self) -> dict[str, Any]:
        return {"network_config": json.dumps(self.config, sort_keys=True)}

    def check(self, state: Mapping[str, Any], source: str | Path) -> None:
        """Raise ``ResumeError`` unless ``state`` (a saved ``state_dict``) describes this run."""
        saved = _canonical(json.loads(state["network_config"]))
        diff = _differences(saved, self.config)
        if diff:
            shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
            raise ResumeError(
                f"cannot resume from {source}: it was trained with another dataset, model or architecture ({shown}); "
                "use a new --output_dir, or pass --resume false to start this run afresh"
            )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.check(state, "the checkpoint")


def _readable(path: Path) -> dict[str, Any] | None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated (EOFError), corrupt zip (RuntimeError), pickle errors
        warnings.warn(f"skipping damaged checkpoint {path} ({type(err).__name__}); trying an older one", stacklevel=2)
        return None
    return state if isinstance(state, dict) else None


@exit_on_error
def resume_checkpoint(
    checkpoint_dir: str | Path, enabled: Any = True, network_config: Mapping[str, Any] | None = None
) -> str | None:
    """The checkpoint a run resumes from: the newest one that loads, after checking what it was trained for.

    Args:
        checkpoint_dir: the run's ``checkpoints/`` folder.
        enabled: the ``resume`` switch (a bool or CLI text).
        network_config: this command's ``network_config``; compared with the checkpoint's fingerprint.

    Returns:
        The path, or ``None`` (resume off, no checkpoint, or none readable: training starts afresh).

    Raises:
        ResumeError: (printed as one ``error:`` line, exit status 2) the checkpoint has no fingerprint or
            another dataset build, model or architecture.
    """
    if not flag(enabled, "resume"):
        return None
    for path in checkpoints(checkpoint_dir):
        state = _readable(path)
        if state is None:
            continue
        if network_config is not None:
            if "run_fingerprint" not in state:
                raise ResumeError(
                    f"cannot resume from {path}: it records no dataset/architecture fingerprint (made by an older "
                    "version); use a new --output_dir, or pass --resume false to start this run afresh"
                )
            RunFingerprint(network_config).check(state["run_fingerprint"], path)
        logger.info(f"resuming from {path}")
        return str(path)
    return None


def _launch_rank() -> int:
    # torchrun sets RANK before the process group exists (the lock is taken before init_process_group)
    return int(os.environ.get("RANK", "0") or 0)


def _lock(folder: Path) -> None:
    key = str(folder.resolve())
    if key in _LOCKS:
        return
    handle = open(folder / LOCK_FILE, "a")  # noqa: SIM115 - held open until the process exits
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ResumeError(
            f"--output_dir {folder} is in use by another training (it holds {folder / LOCK_FILE}); wait for it to "
            "finish or choose another --output_dir"
        ) from None
    _LOCKS[key] = handle


def _remove_temporary(folder: Path) -> list[str]:
    removed = []
    for path in folder.iterdir() if folder.is_dir() else ():
        if _TEMPORARY.match(path.name) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def _archive(checkpoint_dir: Path) -> Path | None:
    if not checkpoints(checkpoint_dir):
        return None
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = checkpoint_dir.with_name(f"{checkpoint_dir.name}.old-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = checkpoint_dir.with_name(f"{checkpoint_dir.name}.old-{stamp}-{n}")
    checkpoint_dir.rename(target)
    return target


@exit_on_error
def claim_output_dir(output_dir: str | Path, checkpoint_dir: str | Path, resume: Any = True) -> Path:
    """Take the run folder for this training (rank 0; other ranks only return the path).

    Creates ``output_dir``, locks it (``LOCK_FILE``, held until the process exits), removes the temporary
    files an interrupted write left in it and in ``checkpoint_dir``, and when ``resume`` is off moves the
    previous run's checkpoints to ``checkpoints.old-<time>`` (kept, not deleted), so that a later rerun
    resumes this run, never the one before it. Call it after every check has passed.

    Raises:
        ResumeError: (printed as one ``error:`` line, exit status 2) another training holds the lock, or the
            folder cannot be written (read-only, full disk).
    """
    folder, ckpt = Path(output_dir), Path(checkpoint_dir)
    if _launch_rank() > 0:
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _lock(folder)
        removed = _remove_temporary(folder) + _remove_temporary(ckpt)
        if removed:
            logger.info(f"removed {len(removed)} temporary file(s) an interrupted run left: {', '.join(removed)}")
        if not flag(resume, "resume") and (archived := _archive(ckpt)) is not None:
            logger.warning(f"--resume false: moved the previous run's checkpoints to {archived}")
    except OSError as err:
        raise ResumeError(
            f"cannot write to --output_dir {folder} ({err.strerror or type(err).__name__}); choose a writable folder"
        ) from None
    return folder


class _AtomicDiskSaver(DiskSaver):
    """``DiskSaver`` with an optional fixed file name, atomic writes, and deletion deferred past the next save."""

    def __init__(self, dirname: str | Path, filename: str | None = None) -> None:
        super().__init__(dirname=str(dirname), require_empty=False, atomic=True)
        self.filename = filename
        self._superseded: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        filename = self.filename or filename
        super().__call__(checkpoint, filename, metadata)
        for old in self._superseded:  # only now that the new file is complete
            if old != filename and (self.dirname / old).is_file():
                super().remove(old)
        self._superseded = []

    def remove(self, filename: str) -> None:
        # ignite's Checkpoint removes the old file *before* writing the new one
        self._superseded.append(self.filename or filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI ``CheckpointSaver`` that never leaves a run without a loadable checkpoint.

    Same arguments as ``monai.handlers.CheckpointSaver``. Differences: files are written atomically; a
    superseded file is deleted after its successor is complete (so ``n_saved=1`` briefly holds two);
    interval checkpoints already in ``save_dir`` up to the resumed epoch are adopted, so they are rotated
    out instead of left behind; ``state_dict``/``load_state_dict`` carry the key-metric ranking (put
    the saver in the trainer's checkpoint to keep the best ``model.pt`` across a resume).
    """

    def __init__(self, save_dir: str, save_dict: dict, **kwargs: Any) -> None:
        super().__init__(save_dir, save_dict, **kwargs)
        self._engine: Engine | None = None
        fixed = {"_final_checkpoint": self._final_filename, "_key_metric_checkpoint": kwargs.get("key_metric_filename")}
        for attr in ("_final_checkpoint", "_key_metric_checkpoint", "_interval_checkpoint"):
            checkpoint: Checkpoint | None = getattr(self, attr)
            if checkpoint is not None:
                checkpoint.save_handler = _AtomicDiskSaver(self.save_dir, fixed.get(attr))

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        self._engine = engine
        if self._interval_checkpoint is not None:
            engine.add_event_handler(Events.STARTED, self._adopt_existing)

    def _adopt_existing(self, engine: Engine) -> None:
        # runs after the CheckpointLoader (attached first), so state.epoch is the resumed epoch
        checkpoint = self._interval_checkpoint
        if checkpoint is None or checkpoint._saved:
            return
        mine = [p for p in checkpoints(self.save_dir) if int(_EPOCH.search(p.name).group(1)) <= engine.state.epoch]
        keep = mine[: checkpoint.n_saved] if checkpoint.n_saved else mine
        checkpoint._saved = [Checkpoint.Item(int(_EPOCH.search(p.name).group(1)), p.name) for p in reversed(keep)]

    def state_dict(self) -> dict[str, Any]:
        """The key-metric ranking (ignite's ``{"_saved": [(priority, filename)]}``) and the attached engine's
        ``best_metric`` / ``best_metric_epoch`` (what MONAI logs as "best value")."""
        saved = [] if self._key_metric_checkpoint is None else self._key_metric_checkpoint._saved
        state: dict[str, Any] = {"_saved": [(float(p), str(f)) for p, f in saved]}
        if self._engine is not None:
            state["best_metric"] = float(getattr(self._engine.state, "best_metric", -1))
            state["best_metric_epoch"] = int(getattr(self._engine.state, "best_metric_epoch", -1))
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        if self._key_metric_checkpoint is not None and state_dict.get("_saved"):
            super().load_state_dict({"_saved": state_dict["_saved"]})
        if self._engine is not None and "best_metric" in state_dict:
            self._engine.state.best_metric = state_dict["best_metric"]
            self._engine.state.best_metric_epoch = state_dict["best_metric_epoch"]
