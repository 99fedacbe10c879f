"""App responsiveness on this machine: start-up (``python app.py`` until the page answers), then, over
the API as a browser would see it, the first preview and the finished grid at the default settings.

Usage: python benchmarks/bench_app.py [--runs 3] [--out benchmarks/results/app.json]
Each generate run uses a new seed, so the standard grid is never served from the cache unless stated.
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
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/app.json")
    a = p.parse_args()
    import httpx
    from gradio_client import Client

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
        client = Client(url, verbose=False)
        d = DEFAULTS
        runs = []
        for seed in range(1, a.runs + 1):
            for method in ("minority guidance", "standard-cached"):
                m = "minority guidance"
                t1 = time.perf_counter()
                job = client.submit(49, d["scale"], d["steps"], d["n"], seed, d["sampler"], m, d["gamma"], d["skip"],
                                    d["interval"], api_name="/generate")
                first = None
                while not job.done():
                    if first is None and job.outputs():
                        first = time.perf_counter() - t1
                    time.sleep(0.02)
                total = time.perf_counter() - t1
                status = job.result()[2]
                runs.append({"seed": seed, "standard_grid": "cached" if method == "standard-cached" else "computed",
                             "first_preview_s": round(first or total, 2), "finished_s": round(total, 2),
                             "status": status})
                print(runs[-1], file=sys.stderr)
        out = {"machine": machine(), "startup_s": round(start, 1), "defaults": d, "runs": runs,
               "note": "first run per seed computes both grids; the second (same seed) reuses the cached "
                       "standard grid, as when only l or w changes"}
        write(Path(a.out), out)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
