"""Issue 17: start-up time and memory of the app with several bundles.

Starts ``python app.py`` (every bundle under assets/) as a subprocess and reports the seconds until the page
answers; then, in this process, measures the resident memory (RSS) of a Library of the same bundles as each
one is warmed (weights, density detectors, real features), and what the LRU pool (at most 2 loaded) frees
when a third load evicts the oldest.

    python benchmarks/app_memory.py --out benchmarks/results/app_memory.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def startup_seconds() -> float:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - t0 < 120:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        return float("nan")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def scenario(k: int) -> dict:
    """In a fresh process: open every bundle, then warm the first ``k`` (k = 3 adds a renamed copy of the first
    bundle, so the pool of 2 must evict one). Returns RSS figures."""
    import shutil
    import tempfile

    from app.library import Library

    paths = list(Library.default_paths())
    tmp = None
    if k > len(paths):
        tmp = Path(tempfile.mkdtemp())
        shutil.copytree(paths[0], tmp / "copy")
        m = json.loads((tmp / "copy" / "manifest.json").read_text())
        m["name"] = "copy"
        (tmp / "copy" / "manifest.json").write_text(json.dumps(m))
        paths.append(tmp / "copy")
    gc.collect()
    out = {"warmed": k, "rss_before_mib": rss_mib()}
    lib = Library.open(paths)
    out["rss_after_open_mib"] = rss_mib()
    for st in lib.studios[:k]:
        t0 = time.perf_counter()
        st.density_model()  # weights, real data, classifier features, PyOD detectors
        st.neighbours_of(st.bundle.real.images[:1])
        out[f"warm_{st.name}_seconds"] = round(time.perf_counter() - t0, 1)
    gc.collect()
    out["rss_after_warm_mib"] = rss_mib()
    out["held"] = lib.pool.loaded()
    if tmp is not None:
        shutil.rmtree(tmp)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/app_memory.json")
    p.add_argument("--scenario", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.scenario is not None:
        print(json.dumps(scenario(a.scenario)))
        return
    res = {"startup_seconds": round(startup_seconds(), 2), "scenarios": []}
    print(f"python app.py answers after {res['startup_seconds']:.1f} s", flush=True)
    for k in (0, 1, 2, 3):
        r = subprocess.run([sys.executable, __file__, "--scenario", str(k)], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)
        res["scenarios"].append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(res["scenarios"][-1], flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
