"""Build the documentation site and screenshot pages of it in headless Chromium, to look at how they render.

    python docs/screenshot.py                      # index, methods, config-reference -> site-shots/*.png
    python docs/screenshot.py sites deployment --out /tmp/shots --height 4000

Needs ``mkdocs-material`` (the ``test`` extra) and Chromium (Debian: ``apt-get install chromium``).
``tests/test_docs_site.py`` uses the same functions and checks that the pictures are not blank.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = ("index", "methods", "config-reference")
HEADER_RGB = (63, 81, 181)  # Material's indigo, the header colour mkdocs.yml picks


def chromium() -> str | None:
    """The Chromium binary on PATH (Debian names it ``chromium``), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def build(site: Path, strict: bool = True) -> Path:
    """``mkdocs build`` of the repository's docs into ``site``; raises with mkdocs' output on failure."""
    cmd = [sys.executable, "-m", "mkdocs", "build", "--site-dir", str(site), "--config-file", str(REPO / "mkdocs.yml")]
    proc = subprocess.run(cmd + (["--strict"] if strict else []), capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"mkdocs build failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return site


def screenshot(html: Path, png: Path, width: int = 1280, height: int = 2000) -> Path:
    """One headless Chromium screenshot of ``html`` (a file of the built site) into ``png``."""
    browser = chromium()
    if browser is None:
        raise RuntimeError("no chromium on PATH (Debian: apt-get install chromium)")
    png.parent.mkdir(parents=True, exist_ok=True)
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={png}",
           f"--window-size={width},{height}", html.resolve().as_uri()]
    # no pipes: chromium helper processes that outlive the browser would hold them open
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60, check=True)
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot for {html}")
    return png


def looks_rendered(png: Path) -> str | None:
    """None when the screenshot looks like a styled page, else what is wrong with it (one line)."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    packed = pixels[::2, ::2] @ np.array([1 << 16, 1 << 8, 1])  # one int per colour, every 4th pixel
    if len(np.unique(packed)) < 16:
        return f"{png.name}: fewer than 16 colours (a blank or unstyled page)"
    header = pixels[:40].reshape(-1, 3)
    if not (np.abs(header - HEADER_RGB).sum(axis=1) < 30).mean() > 0.5:
        return f"{png.name}: the top 40 rows are not mostly the header colour {HEADER_RGB} (theme CSS not loaded?)"
    text = pixels[100:, 250:900].reshape(-1, 3)
    if not (text.sum(axis=1) < 300).mean() > 0.002:
        return f"{png.name}: almost no dark pixels in the content column (no text rendered)"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pages", nargs="*", default=list(PAGES), help="page names without .html (default: %(default)s)")
    ap.add_argument("--site", type=Path, default=REPO / "site", help="build into this folder (default: site/)")
    ap.add_argument("--out", type=Path, default=REPO / "site-shots", help="write the PNGs here")
    ap.add_argument("--height", type=int, default=2000)
    args = ap.parse_args(argv)
    build(args.site)
    for page in args.pages:
        png = screenshot(args.site / f"{page}.html", args.out / f"{page}.png", height=args.height)
        problem = looks_rendered(png)
        print(png, "ok" if problem is None else problem)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
