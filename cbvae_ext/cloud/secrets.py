"""API keys from the environment or an ignored ``.env`` file, and redaction of every text we print or log.

Keys live only in memory: they are sent as the RunPod ``Authorization`` header and (W&B only) as a pod
environment variable, never printed, logged, written to disk, or put in CLI arguments or docker args.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dotenv import dotenv_values

from cbvae_ext.errors import CbvaeError

__all__ = [
    "REDACTED",
    "RUNPOD_KEY_VAR",
    "WANDB_KEY_VAR",
    "RedactingFilter",
    "Secrets",
    "SecretsError",
    "env_file_warning",
    "load_secrets",
    "redact",
]

RUNPOD_KEY_VAR = "RUNPOD_API_KEY"
WANDB_KEY_VAR = "WANDB_API_KEY"
REDACTED = "***"

# API keys are opaque tokens: anything with whitespace or quotes is a paste error, not a key
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-.:=+/]{8,512}$")


class SecretsError(CbvaeError, ValueError):
    """A key is missing or malformed."""


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced by ``***``, longest first (a key containing another is fully hidden)."""
    for value in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return text


@dataclass(frozen=True)
class Secrets:
    """The keys of one launch; ``repr`` never shows them.

    Args:
        runpod_api_key: RunPod API key (required to launch, not for ``--dry-run``).
        wandb_api_key: optional Weights & Biases key; without it the pod logs W&B runs offline.
    """

    runpod_api_key: str | None = field(default=None, repr=False)
    wandb_api_key: str | None = field(default=None, repr=False)

    def values(self) -> list[str]:
        """The secret strings that are set."""
        return [v for v in (self.runpod_api_key, self.wandb_api_key) if v]

    def redact(self, text: str) -> str:
        """``text`` with every key replaced by ``***``."""
        return redact(text, self.values())

    def require_runpod(self) -> str:
        """The RunPod key, or a ``SecretsError`` saying where to put it."""
        if not self.runpod_api_key:
            raise SecretsError(f"{RUNPOD_KEY_VAR} is not set; export it or add it to .env (see .env.example)")
        return self.runpod_api_key


def env_file_warning(env_file: str | Path | None) -> str | None:
    """A one-line warning when ``env_file`` (holding keys) is readable by other users, else ``None``."""
    if env_file is None or not Path(env_file).is_file():
        return None
    mode = stat.S_IMODE(Path(env_file).stat().st_mode)
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        return f"warning: {env_file} holds API keys and is readable by other users (mode {mode:o}); run: chmod 600 {env_file}"
    return None


def load_secrets(env_file: str | Path | None = ".env", environ: Mapping[str, str] | None = None) -> Secrets:
    """Read the keys; a variable set in the environment wins over the same one in ``env_file``.

    Args:
        env_file: dotenv file (``KEY=value`` lines); ignored when absent or ``None``.
        environ: environment to read (default ``os.environ``).

    Raises:
        SecretsError: a key contains whitespace, quotes or other characters no API key has.
    """
    environ = os.environ if environ is None else environ
    file_values: dict[str, str | None] = {}
    if env_file is not None and Path(env_file).is_file():
        file_values = dict(dotenv_values(env_file))
    keys: dict[str, str | None] = {}
    for var in (RUNPOD_KEY_VAR, WANDB_KEY_VAR):
        source, value = ("environment", environ.get(var)) if environ.get(var) else (str(env_file), file_values.get(var))
        value = (value or "").strip() or None
        if value is not None and not _KEY_PATTERN.match(value):
            # never echo the value: it is (almost) a key
            raise SecretsError(
                f"{var} from {source} is malformed (spaces, quotes or odd characters); paste the key alone"
            )
        keys[var] = value
    return Secrets(runpod_api_key=keys[RUNPOD_KEY_VAR], wandb_api_key=keys[WANDB_KEY_VAR])


class RedactingFilter(logging.Filter):
    """Logging filter that replaces secrets in the message, its arguments and any formatted traceback.

    Args:
        secrets: the strings to hide.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage(), self.secrets)
        record.args = None
        if record.exc_info:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info), self.secrets)
            record.exc_info = None
        return True
