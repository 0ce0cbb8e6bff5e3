"""``frozen_heap``: keep the garbage collector off the existing heap while nilearn reads images.

nilearn's ``safe_get_data`` calls ``gc.collect()`` for every image it loads or masks; in a process holding
torch, a dataset and fitted models each call walks that whole heap (0.1 s apiece: 10 of a tiny evaluation's
46 s on one CPU thread, from NiMARE's ``CorrelationDecoder`` and the figures). ``gc.freeze`` moves the
objects alive now out of the collector's view, so those calls only scan what was made since.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["frozen_heap"]


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Freeze the current heap for the collector (``gc.freeze``) inside the block; unfreeze on the way out."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
