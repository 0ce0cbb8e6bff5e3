"""The one exception base class of the package: every bad-input error of cbvae_ext derives from it.

Each module keeps its own named error (``DataError``, ``SchemaError``, ``RunFolderError``, ...) so a
message says where it came from; catching ``CbvaeError`` catches them all (the CLIs, the app and the
launcher print its one-line message instead of a traceback).
"""

from __future__ import annotations

__all__ = ["CbvaeError"]


class CbvaeError(Exception):
    """Bad input, a bad folder or a bad configuration; the message is one line naming the thing and the fix."""
