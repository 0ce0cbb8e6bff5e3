"""Make every value the RunPod SDK pastes into its GraphQL text safe.

``runpod.create_pod`` builds its mutation with f-strings (``dockerArgs: "{docker_args}"``,
``{ key: "{k}", value: "{v}" }``) without escaping, so a ``"`` or ``\\`` in a value would end the string
and let the rest be read as GraphQL (a broken query, or injected fields such as ``gpuCount: 8``).
Plain parameters (image, GPU id, pod name, ...) are checked against an allow-list and rejected with a
one-line error; environment values, which may legitimately hold any text, are base64-encoded into
``CBVAE_B64_<NAME>`` and decoded back by ``scripts/runpod_train.sh`` on the pod.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping

from cbvae_ext.errors import CbvaeError

__all__ = ["B64_PREFIX", "SAFE_CHARS", "GraphQLValueError", "check_value", "decode_env", "encode_env"]

#: characters that can never end or escape a GraphQL string literal (described in error messages)
SAFE_CHARS = "letters, digits, space and _ . , : ; / @ % + = -"
_SAFE_VALUE = re.compile(r"[A-Za-z0-9 _.,:;/@%+=\-]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: pod environment variables whose value is base64 of the real value (decoded by the entry script)
B64_PREFIX = "CBVAE_B64_"


class GraphQLValueError(CbvaeError, ValueError):
    """A value would break (or inject into) the SDK's GraphQL query."""


def check_value(name: str, value: object) -> str:
    """Return ``str(value)`` if it is safe inside a GraphQL string literal.

    Args:
        name: what the value is (CLI option or variable name), used in the error.
        value: the value to check.

    Raises:
        GraphQLValueError: naming ``name`` and the first offending character (never the whole value,
            which may be a secret).
    """
    text = str(value)
    if _SAFE_VALUE.fullmatch(text):
        return text
    bad = next(ch for ch in text if not _SAFE_VALUE.fullmatch(ch))
    raise GraphQLValueError(
        f"{name} contains {bad!r}, which the RunPod SDK would paste unescaped into its GraphQL query; use only {SAFE_CHARS}"
    )


def encode_env(env: Mapping[str, object]) -> dict[str, str]:
    """Pod environment with every unsafe value moved to ``CBVAE_B64_<NAME>`` as base64.

    Args:
        env: variable name to value.

    Raises:
        GraphQLValueError: a name is not a shell identifier, or collides with an encoded name.
    """
    out: dict[str, str] = {}
    for name, value in env.items():
        if not _ENV_NAME.fullmatch(name):
            raise GraphQLValueError(f"pod environment variable name {name!r} must match [A-Za-z_][A-Za-z0-9_]*")
        text = str(value)
        if not _SAFE_VALUE.fullmatch(text):
            name, text = B64_PREFIX + name, base64.b64encode(text.encode()).decode("ascii")
        if name in out:
            raise GraphQLValueError(f"pod environment variable {name} is given twice")
        out[name] = text
    return out


def decode_env(env: Mapping[str, str]) -> dict[str, str]:
    """Inverse of :func:`encode_env` (what the entry script does on the pod)."""
    out: dict[str, str] = {}
    for name, value in env.items():
        if name.startswith(B64_PREFIX):
            out[name[len(B64_PREFIX) :]] = base64.b64decode(value).decode()
        else:
            out[name] = value
    return out
