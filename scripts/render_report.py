"""Render a report's ``index.html`` to a full-page PNG in headless Chromium, to look at it as a reader would.

    python scripts/render_report.py demo-out/index.html demo-out/report.png [--width 1400] [--tile 1300]

The screenshot is cut below the last non-white row; ``--tile H`` also writes ``report_0.png``, ``report_1.png``, …
of height H, small enough for an image viewer to show at full resolution.

Uses Debian's ``chromium`` (``apt-get install chromium``) with the flags this sandbox needs (no sandbox, no GPU, no
background networking: the page is self-contained, so nothing is fetched).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path


def render(html: Path, png: Path, width: int = 1400, height: int | None = None, tile: int | None = None
           ) -> list[Path]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise FileNotFoundError("no chromium found: apt-get install chromium")
    if height is None:
        # a tall window captures the whole page: ~1 px per 25 bytes of HTML is generous for this layout
        height = max(2000, min(30000, html.stat().st_size // 25))
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        f"--screenshot={png.resolve()}", html.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
    return _trim_and_tile(png, tile)


def _trim_and_tile(png: Path, tile: int | None) -> list[Path]:
    try:
        from PIL import Image, ImageChops
    except ImportError:  # no Pillow: keep the full window
        return [png]
    im = Image.open(png).convert("RGB")
    box = ImageChops.difference(im, Image.new("RGB", im.size, (255, 255, 255))).getbbox()
    if box is not None:
        im = im.crop((0, 0, im.size[0], min(im.size[1], box[3] + 20)))
    im.save(png)
    out = [png]
    if tile:
        for k, top in enumerate(range(0, im.size[1], tile)):
            path = png.with_name(f"{png.stem}_{k}{png.suffix}")
            im.crop((0, top, im.size[0], min(top + tile, im.size[1]))).save(path)
            out.append(path)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("html", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--tile", type=int, default=None, help="also write tiles of this height")
    args = parser.parse_args()
    for path in render(args.html, args.png, args.width, args.height, args.tile):
        print(path)


if __name__ == "__main__":
    main()
