"""The app in a real headless Chromium: type a query, see the views and the glass brain, open a shared link,
upload a study file, and the server answers on 127.0.0.1 only."""

from __future__ import annotations

import io
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from app_browser import (
    MA_CAPTION,
    TYPICALITY,
    UPLOAD_INPUT,
    VIEWS,
    HeadlessChromium,
    find_chromium,
    serve_app,
    your_study_shown,
)
from study_files import test_split_studies, write_sleuth

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


def _choose_your_study(browser: HeadlessChromium, app_url: str) -> None:
    state = browser.open_app(app_url, min_images=8, timeout=300)
    assert all(view in state["text"] for view in VIEWS), state["text"][:800]
    state = browser.start_from_your_study()
    assert "Upload a study in the sidebar" in state["text"], state["text"][:800]


def test_upload_a_sleuth_file_shows_your_study(
    app_url: str, tiny_dataset: Path, neurosynth_dir: Path, tmp_path: Path
) -> None:
    """A real test-split study written as a one-study Sleuth file, chosen in the file dialog: its page."""
    from cbvae_ext.data import load_dataset_info

    meta = load_dataset_info(tiny_dataset).metadata
    mni = test_split_studies(meta, neurosynth_dir)["MNI"]
    sleuth = write_sleuth(tmp_path / "mine.txt", [("mine", mni["xyz"])], "MNI")
    browser = HeadlessChromium(tmp_path / "profile")
    try:
        _choose_your_study(browser, app_url)
        browser.set_files(UPLOAD_INPUT, sleuth)
        # the view, and the generated map above it starting from the upload
        state = browser.wait_until(lambda s: your_study_shown(s, "your study mine (mine.txt)"), timeout=120)
        assert your_study_shown(state, "your study mine (mine.txt)"), state["text"][:3000]
        ma_shot = browser.screenshot(image_caption=MA_CAPTION)
    finally:
        browser.close()
    assert state["exceptions"] == 0 and "Traceback" not in state["text"]
    rounded, n_reference, percentile = TYPICALITY.search(state["text"]).groups()
    assert 0.0 <= float(percentile) <= 100.0 and int(rounded) == round(float(percentile))
    assert int(n_reference) == int((meta["split"] == "test").sum())  # the run's reference: the test split
    assert "Nearest dataset studies" in state["text"]  # (its cells are drawn on a canvas: test_app.py reads them)
    assert _hot_pixels(ma_shot) > 100  # its peaks drawn with the hot colour map


def test_unreadable_upload_shows_one_line_and_the_page_works(app_url: str, tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_bytes(b"{not json")
    browser = HeadlessChromium(tmp_path / "profile")
    try:
        _choose_your_study(browser, app_url)
        browser.set_files(UPLOAD_INPUT, broken)
        state = browser.wait_until(lambda s: bool(s["errors"]), timeout=120)
        errors, images = [e.replace("\u2060", "") for e in state["errors"]], state["images"]
        # the page still answers: back to a real study, its views come back
        browser.click_option("Start from", "Real study")
        after = browser.wait_until(lambda s: all(v in s["text"] for v in VIEWS) and s["images"] >= 8, timeout=120)
    finally:
        browser.close()
    assert len(errors) == 1 and errors[0].startswith("broken.json is not valid JSON") and "\n" not in errors[0], errors
    assert state["exceptions"] == 0 and "Traceback" not in state["text"]
    assert images == 0 and "Your study's MA map" not in state["text"]  # nothing of another study is shown
    assert all(v in after["text"] for v in VIEWS) and after["exceptions"] == 0 and not after["errors"]


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
