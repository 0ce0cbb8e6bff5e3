"""``frozen_heap``: objects alive when the block starts are out of the collector's view inside it, and back after."""

from __future__ import annotations

import gc

import pytest

from cbvae_ext.heap import frozen_heap


def test_the_heap_is_frozen_inside_and_thawed_after_an_error() -> None:
    before = gc.get_freeze_count()
    with pytest.raises(RuntimeError, match="boom"), frozen_heap():
        assert gc.get_freeze_count() > before  # what existed is frozen: nilearn's gc.collect() skips it
        raise RuntimeError("boom")
    assert gc.get_freeze_count() == 0
