"""App responsiveness on this machine: start-up (``python app.py`` until the page answers), then in headless
Chromium (Playwright), as a visitor sees it: after pressing Generate at the default settings, the time until
the guided grid shows its first preview of all images, and until the status says Done (both grids final).

Usage: python benchmarks/bench_app.py [--runs 2] [--warm-wait 30] [--out benchmarks/results/app.json]
Each seed runs twice: first both grids are computed, then (same seed, as when only l or w changes) the
standard grid comes from the cache.

``--live "DDIM:25,DPM-Solver++ 2M:10"`` (issue 26.3) then measures the live path for each sampler:steps setting
in the same browser and server, side by side: one Generate caches the standard grid, then ``--live-runs`` releases
of the w slider (each a new w), timed from the release to the status's first "Sampling" (the first preview) and
to "Done" (the guided grid with its captions, the standard grid from the cache).
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--warm-wait", type=float, default=30.0, help="seconds to wait after start-up before measuring")
    p.add_argument("--out", default="benchmarks/results/app.json")
    p.add_argument("--live", default=None, help='sampler:steps settings compared on slider releases, e.g. '
                                                '"DDIM:25,DPM-Solver++ 2M:10"')
    p.add_argument("--live-runs", type=int, default=5)
    a = p.parse_args()
    import httpx

    from app.handlers import DEFAULTS

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > 120:
                raise SystemExit("the app did not answer within 120 s")
            time.sleep(0.1)
        start = time.perf_counter() - t0
        print(f"start-up: {start:.1f} s", file=sys.stderr)
        time.sleep(a.warm_wait)  # let the background warm-up finish, as for any visitor after the first
        from playwright.sync_api import sync_playwright

        d = DEFAULTS
        runs = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector("#generate", timeout=60_000)
            for seed in range(1, a.runs + 1):
                box = page.locator("#seed input")
                box.fill(str(seed))
                box.press("Enter")
                for grid in ("computed", "cached"):
                    t1 = time.perf_counter()
                    page.click("#generate")
                    page.wait_for_function(f"document.querySelectorAll('#guided img').length >= {d['n']} && "
                                           "document.querySelector('#status').innerText.startsWith('Sampling')",
                                           timeout=120_000, polling=20)
                    first = time.perf_counter() - t1
                    page.wait_for_function("document.querySelector('#status').innerText.startsWith('Done')",
                                           timeout=300_000, polling=20)
                    total = time.perf_counter() - t1
                    runs.append({"seed": seed, "standard_grid": grid, "first_preview_s": round(first, 2),
                                 "finished_s": round(total, 2), "status": page.inner_text("#status")})
                    print(runs[-1], file=sys.stderr)
            live = _live(page, a.live, a.live_runs) if a.live else None
            browser.close()
        out = {"machine": machine(), "startup_s": round(start, 1), "defaults": d, "runs": runs, "live": live,
               "note": "measured in headless Chromium; first run per seed computes both grids, the second "
                       "(same seed) reuses the cached standard grid, as when only l or w changes"}
        write(Path(a.out), out)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _live(page, spec: str, runs: int) -> dict:
    """Slider release -> first preview and Done, per sampler:steps setting, standard grid cached."""
    import numpy as np

    def status():
        return page.inner_text("#status")

    out = {}
    for item in spec.split(","):
        label, steps = item.rsplit(":", 1)
        page.locator("#sampler input").click()
        page.get_by_role("option", name=label, exact=True).click()
        box = page.locator("#steps input[type=number]")
        box.fill(steps)
        box.press("Enter")
        page.click("#generate")  # caches the standard grid for this seed, steps and sampler
        page.wait_for_function("document.querySelector('#status').innerText.startsWith('Done') && "
                               f"document.querySelector('#status').innerText.includes('{steps} {label}')",
                               timeout=300_000, polling=20)
        first, done = [], []
        for k in range(runs):
            slider = page.locator("#scale input[type=range]")
            slider.scroll_into_view_if_needed()  # before every release: the box is in viewport coordinates and the
            track = slider.bounding_box()  # page's layout moves as grids and captions arrive
            t1 = time.perf_counter()
            page.mouse.click(track["x"] + (0.1 + 0.1 * k) * track["width"], track["y"] + track["height"] / 2)
            page.wait_for_function("document.querySelector('#status').innerText.startsWith('Sampling')",
                                   timeout=120_000, polling=10)
            first.append(time.perf_counter() - t1)
            page.wait_for_function("document.querySelector('#status').innerText.startsWith('Done')",
                                   timeout=300_000, polling=10)  # after 'Sampling': this run's Done (a repeated
            # w can repeat the previous status word for word, so the text is not compared with it)
            done.append(time.perf_counter() - t1)
            print(f"live {label} {steps}: first {first[-1]:.2f} s, done {done[-1]:.2f} s | {status()[:90]}",
                  file=sys.stderr)
        out[item] = {"first_preview_s": [round(v, 3) for v in first], "finished_s": [round(v, 3) for v in done],
                     "median_first_s": round(float(np.median(first)), 3), "median_finished_s": round(float(np.median(done)), 3)}
    keys = list(out)
    if len(keys) >= 2:
        out["ratio_finished"] = round(out[keys[0]]["median_finished_s"] / out[keys[-1]]["median_finished_s"], 2)
    return out


if __name__ == "__main__":
    main()
