"""The app in a real headless Chromium: type a query, see the views and the glass brain, open a shared link,
and the server answers on 127.0.0.1 only."""

from __future__ import annotations

import io
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from app_browser import VIEWS, HeadlessChromium, find_chromium, serve_app

pytestmark = pytest.mark.browser

WORDS_LABEL = "Terms (e.g. working memory, pain, theory of mind)"
#: A shared link that used to close the warning's code span and render a link and a remote image.
HOSTILE = "%60%5BLog%20in%5D(https://ev.il/x)%20!%5Bt%5D(https://ev.il/t.png)"


@pytest.fixture(scope="module")
def app_url(tiny_runs: dict[str, Path], tiny_dataset: Path):
    """``streamlit run`` on the tiny trained run (with its dataset), served on a free local port."""
    if find_chromium() is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium; .ci/run does this)")
    with serve_app(tiny_runs["cbvae"], tiny_dataset) as url:
        yield url


def _hot_pixels(png: bytes) -> int:
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
    assert pixels.std() > 10.0  # not a blank page
    # the hot colour map draws saturated red/yellow pixels that no Streamlit chrome uses
    return int(((pixels[..., 0] > 180) & (pixels[..., 2] < 80) & (pixels[..., 0] - pixels[..., 2] > 120)).sum())


def test_type_a_query_then_open_the_shared_link(app_url: str, tmp_path: Path) -> None:
    browser = HeadlessChromium(tmp_path / "profile", width=1400, height=2600)
    try:
        # the first session loads torch, the decoder and the template: minutes on a busy CI machine
        state = browser.open_app(f"{app_url}/?seed=3", min_images=8, timeout=300)
        for view in VIEWS:
            assert view in state["text"], f"{view!r} not rendered; the page says: {state.get('text', '')[:800]}"
        browser.type_into(WORDS_LABEL, "working memory")
        state = browser.wait_for_text("Recognised: working memory", timeout=120)
        assert "Recognised: working memory" in state["text"], state["text"][:800]
        assert "glass brain" in state["text"] and "GENERATED" in state["text"]
        assert state["exceptions"] == 0 and "Traceback" not in state["text"]
        # the page writes its state into the address bar at the end of each rerun
        deadline = time.monotonic() + 60
        while "q=working" not in (shared := browser.evaluate("location.href")) and time.monotonic() < deadline:
            time.sleep(0.5)
        shot = browser.screenshot()
    finally:
        browser.close()
    assert "q=working+memory" in shared or "q=working%20memory" in shared
    assert "seed=3" in shared and "topics=" in shared
    assert _hot_pixels(shot) > 500

    # a second browser opens the shared link: the same words, topics and starting point come back
    other = HeadlessChromium(tmp_path / "profile2", width=1400, height=2000)
    try:
        state = other.open_app(shared, min_images=8, timeout=300)
        value = other.evaluate(f"document.querySelector('input[aria-label=\"{WORDS_LABEL}\"]').value")
    finally:
        other.close()
    assert value == "working memory"
    assert "prior draw, seed 3" in state["text"] and "Recognised: working memory" in state["text"]
    assert "in the link:" not in state["text"]  # every parameter of the shared link was valid


def test_bad_link_shows_a_message_and_the_page(app_url: str, tmp_path: Path) -> None:
    browser = HeadlessChromium(tmp_path / "profile")
    try:
        link = f"{app_url}/?seed=3&year=1e400&sweep=%3Cb%3Ex%3C/b%3E&task={HOSTILE}&q={HOSTILE}&{HOSTILE}=1"
        state = browser.open_app(link, min_images=8, timeout=300)
        bold = browser.evaluate("document.querySelectorAll('b').length")
        foreign = browser.evaluate(
            "Array.from(document.querySelectorAll('a[href], img[src]')).map(e => new URL(e.href || e.src).hostname)"
            ".filter(host => host.endsWith('ev.il'))"
        )
    finally:
        browser.close()
    assert all(view in state["text"] for view in VIEWS)
    state["text"] = state["text"].replace("\u2060", "")  # the escape's word joiners, which break autolinks
    assert "ignored year=1e400 in the link" in state["text"] and "ignored sweep=<b>x</b> in the link" in state["text"]
    assert "ignored task=`[Log in](https://ev.il/x) ![t](https://… in the link" in state["text"]  # as given
    assert "not a parameter of this page" in state["text"]
    assert bold == 0 and foreign == []  # the markup in the link is shown as text: no bold, no link, no image


def test_served_on_every_interface_the_page_refuses(tiny_runs: dict[str, Path], tmp_path: Path) -> None:
    """Started outside the repository root, Streamlit finds no config and binds every interface: the page
    says so and shows nothing of the run."""
    if find_chromium() is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium; .ci/run does this)")
    with serve_app(tiny_runs["cbvae"], cwd=tmp_path) as url:
        browser = HeadlessChromium(tmp_path / "profile")
        try:
            browser.call("Page.navigate", url=url)
            state = browser.wait_for_text("Not serving", timeout=120)
            images = browser.evaluate("document.images.length")
        finally:
            browser.close()
    assert "Not serving: this page would be reachable from other machines" in state["text"], state["text"][:800]
    assert "--server.address 127.0.0.1" in state["text"] and "CBVAE_APP_ALLOW_REMOTE=1" in state["text"]
    assert not any(view in state["text"] for view in VIEWS) and images == 0


def _outside_address() -> str | None:
    """This machine's address on its default route (not loopback), or None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent by a UDP connect
            address = sock.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_server_answers_on_localhost_only(app_url: str) -> None:
    port = app_url.rsplit(":", 1)[1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=10) as resp:
        assert resp.status == 200
    address = _outside_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address to test")
    # before .streamlit/config.toml the server listened on all interfaces and answered here
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{address}:{port}/_stcore/health", timeout=5)
