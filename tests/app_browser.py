"""Drive the Counterfactual Machine in a real headless Chromium: serve it, load a page, read it, screenshot it.

Used by ``tests/test_app_browser.py`` and by ``scripts/screenshot_app.py`` (the documentation screenshots).

Streamlit renders client-side over a websocket after the page's load event, so instead of a fixed
``--virtual-time-budget`` the page is polled through the Chrome DevTools protocol until the views exist.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "APP", "CHROMIUM_FLAGS", "MA_CAPTION", "REPO_ROOT", "TYPICALITY", "UPLOAD_INPUT", "VIEWS", "BrowserError",
    "HeadlessChromium", "find_chromium", "serve_app", "your_study_shown",
]  # fmt: skip

REPO_ROOT = Path(__file__).resolve().parents[1]
APP = REPO_ROOT / "app" / "streamlit_app.py"
#: Headings of the page's views; the page is ready when all show and their images have loaded.
VIEWS: tuple[str, ...] = ("Ask in words", "Generated map", "Counterfactual difference", "Evidence", "Sweep")
#: The "Your study" file uploader's input (the page has one file uploader).
UPLOAD_INPUT = '[data-testid="stFileUploader"] input[type="file"]'
#: Start of the caption of the uploaded study's MA map.
MA_CAPTION = "Your study's MA map"
#: The "Your study" view's typicality sentence: rounded percent, reference studies, percentile.
TYPICALITY = re.compile(
    r"Typicality: the model finds this map more likely than (\d+)% of the dataset's (\d+) test studies "
    r"\(percentile (\d+\.\d)"
)
CHROMIUM_FLAGS: tuple[str, ...] = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--hide-scrollbars",
)

# text of the page, the number of images served by Streamlit's media endpoint that finished loading, the texts of
# its error boxes and the captions of its loaded images
_PAGE_STATE = """JSON.stringify({
  text: document.body ? document.body.innerText : "",
  images: Array.from(document.images).filter(i => i.src.includes("/media/") && i.complete && i.naturalWidth > 0).length,
  running: !!document.querySelector('[data-testid="stStatusWidget"]'),
  exceptions: document.querySelectorAll('[data-testid="stException"]').length,
  errors: Array.from(document.querySelectorAll('[data-testid="stAlertContentError"]')).map(e => e.innerText.trim()),
  loaded: Array.from(document.querySelectorAll('[data-testid="stImageContainer"]'))
    .filter(c => { const i = c.querySelector('img'); return i && i.complete && i.naturalWidth > 0; })
    .map(c => (c.querySelector('[data-testid="stImageCaption"]') || {innerText: ""}).innerText.trim()),
})"""
# centre of the option label of a radio group (by the group's aria-label), scrolled into view; null if absent
_RADIO_OPTION = """(([group, option]) => {
  const g = document.querySelector('[role="radiogroup"][aria-label=' + JSON.stringify(group) + ']');
  const o = g && Array.from(g.querySelectorAll('label')).find(l => l.innerText.trim() === option);
  if (!o) return null;
  o.scrollIntoView({block: "center"});
  const r = o.getBoundingClientRect();
  return [r.x + r.width / 2, r.y + r.height / 2];
})"""
# page rectangle (what a screenshot's clip takes) of the loaded image whose caption starts with the given text; null if none
_IMAGE_RECT = """((caption) => {
  const c = Array.from(document.querySelectorAll('[data-testid="stImageContainer"]'))
    .find(c => (c.querySelector('[data-testid="stImageCaption"]') || {innerText: ""}).innerText.trim().startsWith(caption));
  const i = c && c.querySelector('img');
  if (!i || !i.complete || !i.naturalWidth) return null;
  i.scrollIntoView({block: "center"});
  const r = i.getBoundingClientRect();
  return {x: r.x + window.scrollX, y: r.y + window.scrollY, width: r.width, height: r.height};
})"""


def your_study_shown(state: dict[str, Any], source: str | None = None) -> bool:
    """Whether a page state shows the "Your study" view: its heading, its typicality sentence and its loaded MA map
    image, and (given ``source``, as in ``"your study mine (mine.txt)"``) the generated map starting from that upload."""
    return (
        "\nYour study\n" in state["text"]  # the heading, not the radio option
        and TYPICALITY.search(state["text"]) is not None
        and any(c.startswith(MA_CAPTION) for c in state["loaded"])
        and (source is None or f"start: {source}" in state["text"])
    )


class BrowserError(RuntimeError):
    """Chromium or the Streamlit server did not start or answer."""


def find_chromium() -> str | None:
    """Path of a Chromium binary (Debian's ``chromium``), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def serve_app(
    run_dir: Path, dataset_dir: Path | None = None, timeout: float = 120.0, cwd: Path = REPO_ROOT
) -> Iterator[str]:
    """``streamlit run app/streamlit_app.py`` on a free local port; yields its URL and stops it afterwards.

    ``cwd``: the working directory Streamlit reads ``.streamlit/config.toml`` from (the repository root's binds
    127.0.0.1; elsewhere the server binds every interface and the page refuses to serve).

    Raises:
        BrowserError: the server exited or did not answer ``/_stcore/health`` within ``timeout`` seconds.
    """
    port = _free_port()
    # no --server.address: the repository's .streamlit/config.toml must keep the app on 127.0.0.1
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.headless", "true", "--server.port", str(port),
        "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
        "--", "--run_dir", str(run_dir), *(["--dataset_dir", str(dataset_dir)] if dataset_dir else []),
    ]  # fmt: skip
    env = {
        k: v for k, v in os.environ.items() if k not in ("CBVAE_RUN_DIR", "CBVAE_DATASET_DIR", "CBVAE_APP_ALLOW_REMOTE")
    }
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise BrowserError(f"streamlit exited with {proc.returncode}: {log.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BrowserError(f"streamlit did not answer on {url} within {timeout:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        _stop(proc)
        log.close()


class HeadlessChromium:
    """One headless Chromium page driven through the DevTools protocol (``websockets``, a Streamlit dependency).

    Args:
        profile: an empty folder for the browser profile.
        width: window width in pixels.
        height: window height in pixels.
        chromium: browser binary (default ``find_chromium()``).
    """

    def __init__(self, profile: Path, width: int = 1400, height: int = 2200, chromium: str | None = None) -> None:
        from websockets.sync.client import connect

        chromium = chromium or find_chromium()
        if chromium is None:
            raise BrowserError("chromium is not installed (apt-get install -y chromium)")
        profile.mkdir(parents=True, exist_ok=True)
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.ws: Any = None
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise BrowserError(f"chromium did not open its DevTools port ({cmd[0]})")
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            page = next(t for t in json.load(resp) if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self._id = 0
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and return its result."""
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=120))
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise BrowserError(f"{method}: {msg['error']}")
                return msg["result"]

    def evaluate(self, expression: str) -> Any:
        """Value of a JavaScript expression in the page."""
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def open_app(self, url: str, min_images: int = 8, timeout: float = 300.0) -> dict[str, Any]:
        """Navigate to the app and wait until the three views and ``min_images`` images have rendered.

        Returns the last page state (``text``, ``images``, ``running``, ``exceptions``), ready or not.
        """
        self.call("Page.navigate", url=url)
        deadline, state = time.monotonic() + timeout, {}
        while time.monotonic() < deadline:
            state = json.loads(self.evaluate(_PAGE_STATE))
            if all(v in state["text"] for v in VIEWS) and state["images"] >= min_images and not state["running"]:
                time.sleep(0.5)  # let the last images paint
                break
            time.sleep(1.0)
        return state

    def type_into(self, aria_label: str, text: str) -> None:
        """Type ``text`` into the input with this ``aria-label`` (as a user would) and press Enter."""
        found = self.evaluate(
            f"(() => {{ const e = document.querySelector('input[aria-label=' + {json.dumps(json.dumps(aria_label))} + ']');"
            " if (!e) return false; e.focus(); e.select(); return true; })()"
        )
        if not found:
            raise BrowserError(f"no input labelled {aria_label!r} on the page")
        self.call("Input.insertText", text=text)
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)

    def click_option(self, group: str, option: str) -> None:
        """Click the option labelled ``option`` of the radio group labelled ``group`` with the mouse, as a user would
        (Streamlit's radios take pointer events, not a scripted ``click()``)."""
        centre = self.evaluate(f"{_RADIO_OPTION}({json.dumps([group, option])})")
        if centre is None:
            raise BrowserError(f"no option {option!r} in a radio group labelled {group!r} on the page")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=centre[0], y=centre[1], button="left", clickCount=1)

    def start_from_your_study(self) -> dict[str, Any]:
        """Choose "Your study" as the starting point and wait for the page to ask for a file; returns the state."""
        self.click_option("Start from", "Your study")
        return self.wait_for_text("Upload a study in the sidebar", timeout=60)

    def set_files(self, selector: str, *paths: Path) -> None:
        """Put files on the ``<input type=file>`` matched by the CSS ``selector``, as choosing them in the file dialog
        does (the page gets its ``input`` and ``change`` events)."""
        root = self.call("DOM.getDocument", depth=0)["root"]["nodeId"]
        node = self.call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        if not node:  # DOM.querySelector answers node 0 for no match
            raise BrowserError(f"no element matches {selector!r} on the page")
        self.call("DOM.setFileInputFiles", nodeId=node, files=[str(Path(p).resolve()) for p in paths])

    def wait_until(
        self, ready: Callable[[dict[str, Any]], bool], timeout: float = 120.0, poll: float = 0.5, settle: float = 0.5
    ) -> dict[str, Any]:
        """Poll the page state every ``poll`` seconds until ``ready(state)`` holds and no script run is pending;
        after ``settle`` seconds (for the last paint) returns the state then, else the last state at the timeout."""
        deadline, state = time.monotonic() + timeout, {}
        while time.monotonic() < deadline:
            state = json.loads(self.evaluate(_PAGE_STATE))
            if ready(state) and not state["running"]:
                if settle:
                    time.sleep(settle)
                    state = json.loads(self.evaluate(_PAGE_STATE))
                return state
            time.sleep(poll)
        return state

    def wait_for_text(self, text: str, timeout: float = 120.0) -> dict[str, Any]:
        """Poll until ``text`` shows on the page and no script run is pending; returns the page state."""
        return self.wait_until(lambda state: text in state["text"], timeout)

    def screenshot(self, image_caption: str | None = None) -> bytes:
        """PNG of the viewport, or of the one loaded image whose caption starts with ``image_caption``."""
        params: dict[str, Any] = {"format": "png"}
        if image_caption is not None:
            rect = self.evaluate(f"{_IMAGE_RECT}({json.dumps(image_caption)})")
            if rect is None:
                raise BrowserError(f"no loaded image with a caption starting {image_caption!r} on the page")
            params["clip"] = {**rect, "scale": 1}
        return base64.b64decode(self.call("Page.captureScreenshot", **params)["data"])

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
        _stop(self.proc)
