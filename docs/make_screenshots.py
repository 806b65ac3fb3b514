"""Regenerate the README's screenshots (docs/images/*.png) from the demo store (the Shapes CLIP, the zoo, the
spurious-cue organism), as `make demo` builds it:

    clip-atlas demo --no-serve
    python docs/make_screenshots.py

Needs Chromium and Playwright (`make browser`).
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "images"
IMAGE = 8571488864101042969          # the demo store's first image (images/000000.png), a red triangle on sand
SHOTS = {"leaderboard.png": ("?rank=association", "Leaderboard", 1500),
         "compare.png": ("compare?runs=shapes-demo,shapes-deep-demo&prop=background", "Compare models", 2400),
         "head.png": ("head?run=shapes-demo&layer=5&head=1", "Head", 2000),
         "intervene.png": (f"intervene?run=shapes-demo&ablate=color&image={IMAGE}", "Intervene", 2100),
         "describe.png": (f"describe?run=shapes-demo&image={IMAGE}", "Describe an image", 1700),
         "which_heads.png": (f"topic_segmentation?run=shapes-demo&text=a+red+triangle&image={IMAGE}", "Topic segmentation", 1500)}


ONLY = set(sys.argv[1:])        # names of the shots to retake (default: all)


def main() -> None:
    from playwright.sync_api import sync_playwright
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "dashboard" / "app.py"),
                             "--server.port", str(port), "--server.headless", "true", "--", "--store",
                             str(ROOT / "artifacts")], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{url}/_stcore/health", timeout=2)
                break
            except OSError:
                time.sleep(0.3)
        OUT.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium", headless=True,
                                        args=["--no-sandbox", "--disable-gpu"])
            for name, (path, title, height) in SHOTS.items():
                if ONLY and name not in ONLY:
                    continue
                page = browser.new_page(viewport={"width": 1400, "height": height})
                page.goto(f"{url}/{path}", wait_until="domcontentloaded")
                page.get_by_role("heading", name=title, exact=True).first.wait_for(timeout=90_000)
                page.locator("canvas.marks:visible, svg.marks:visible, [data-testid='stImage'] img:visible").first.wait_for(timeout=90_000)
                time.sleep(4)
                raw = OUT / f"raw-{name}"
                page.screenshot(path=str(raw))
                img = Image.open(raw).convert("RGB")
                img.thumbnail((1000, 1600))
                img.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(OUT / name, optimize=True)   # octree keeps small swatches
                raw.unlink()
                print(f"{OUT / name}: {(OUT / name).stat().st_size // 1024} KB")
            browser.close()
    finally:
        proc.terminate()


if __name__ == "__main__":
    main()
