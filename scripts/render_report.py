"""Render a report's ``index.html`` to a full-page PNG in headless Chromium, to look at it as a reader would.

    python scripts/render_report.py demo-out/index.html demo-out/report.png [--width 1280]

Uses Debian's ``chromium`` (``apt-get install chromium``) with the flags this sandbox needs (no sandbox, no GPU, no
background networking: the page is self-contained, so nothing is fetched).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path


def render(html: Path, png: Path, width: int = 1280, height: int | None = None) -> Path:
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
    return png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("html", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=None)
    args = parser.parse_args()
    print(render(args.html, args.png, args.width, args.height))


if __name__ == "__main__":
    main()
