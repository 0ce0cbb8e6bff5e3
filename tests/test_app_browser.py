"""The app in a real headless Chromium: the page must show the three views (DOM and pixels)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from cbvae_ext.app_browser import VIEWS, HeadlessChromium, find_chromium, serve_app

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def app_url(tiny_runs: dict[str, Path], tiny_dataset: Path):
    """``streamlit run`` on the tiny trained run (with its dataset), served on a free local port."""
    if find_chromium() is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium; .ci/run does this)")
    with serve_app(tiny_runs["cbvae"], tiny_dataset) as url:
        yield url


def test_page_shows_the_three_views(app_url: str, tmp_path: Path) -> None:
    browser = HeadlessChromium(tmp_path / "profile", width=1400, height=2200)
    try:
        # the first session loads torch, the decoder and the template: minutes on a busy CI machine
        state = browser.open_app(app_url, min_images=9, timeout=300)
        dom = browser.evaluate("document.documentElement.outerHTML")
        shot = browser.screenshot()
    finally:
        browser.close()
    for view in VIEWS:
        assert view in state["text"], f"{view!r} not rendered; the page says: {state.get('text', '')[:800]}"
    assert "Counterfactual Machine" in dom
    # generated, real, difference and six year-sweep images
    assert state["images"] >= 9
    assert state["exceptions"] == 0 and "Traceback" not in state["text"]
    assert "Real map of the study" in state["text"]

    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (2200, 1400)
    assert pixels.std() > 10.0  # not a blank page
    # the hot colour map draws saturated red/yellow pixels that no Streamlit chrome uses
    hot = (pixels[..., 0] > 180) & (pixels[..., 2] < 80) & (pixels[..., 0] - pixels[..., 2] > 120)
    assert hot.sum() > 500


def test_query_parameters_set_a_year_counterfactual(app_url: str, tmp_path: Path) -> None:
    browser = HeadlessChromium(tmp_path / "profile")
    try:
        state = browser.open_app(f"{app_url}/?seed=3&year=2026", min_images=8, timeout=300)
    finally:
        browser.close()
    assert all(view in state["text"] for view in VIEWS)
    assert "prior draw, seed 3" in state["text"] and "extrapolation" in state["text"]
