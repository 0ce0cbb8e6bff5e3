"""Screenshot the Counterfactual Machine in headless Chromium (the pictures in the README and bundle/docs).

Usage::

    python scripts/screenshot_app.py --run_dir runs/cbvae --dataset_dir runs/data_1000 \\
        --query "q=working+memory&year=2018" --out bundle/docs/ask_in_words.png

The page is served on 127.0.0.1 and driven through the DevTools protocol by ``tests/app_browser.py``.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from app_browser import VIEWS, BrowserError, HeadlessChromium, serve_app  # noqa: E402

__all__: list[str] = []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", required=True, type=Path)
    parser.add_argument("--dataset_dir", type=Path)
    parser.add_argument("--query", default="", help="URL query, e.g. 'q=working+memory&year=2018'")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--crop", default="0,0,1400,1500", help="left,top,right,bottom in page pixels")
    parser.add_argument("--height", type=int, default=2400, help="browser window height")
    parser.add_argument("--width", type=int, default=1000, help="width of the saved PNG")
    parser.add_argument("--min_images", type=int, default=8, help="images the page must show first")
    args = parser.parse_args(argv)
    from PIL import Image

    try:
        with serve_app(args.run_dir, args.dataset_dir) as url, tempfile.TemporaryDirectory() as tmp:
            browser = HeadlessChromium(Path(tmp) / "profile", height=args.height)
            try:
                state = browser.open_app(f"{url}/?{args.query}" if args.query else url, min_images=args.min_images)
                png = browser.screenshot()
            finally:
                browser.close()
    except BrowserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not all(v in state.get("text", "") for v in VIEWS):
        print(f"error: the page did not render its views: {state.get('text', '')[:300]}", file=sys.stderr)
        return 2
    img = Image.open(io.BytesIO(png)).convert("RGB").crop(tuple(int(v) for v in args.crop.split(",")))
    img = img.resize((args.width, round(img.height * args.width / img.width)), Image.LANCZOS)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    img.quantize(colors=128).save(args.out, optimize=True)
    print(f"{args.out}: {img.width}x{img.height}, {args.out.stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
