"""Issue 26.3: what a thread per run costs. One 30-step DPM-Solver++ 2M SDE guided grid of 16 MRI images plus its
caption scores, timed (median of 4 after one warm-up) in a fresh process per mode, so no mode inherits another's
OpenMP thread pools:

- app: the app as built since session 12: warm-up and every run on handlers.TORCH_WORKER (``Studio.generate_all``);
- threads: warm-up and every run on a fresh thread each (the app before session 12);
- main / worker: the timed runs on the main thread / on a thread of their own, while the warm-up's sampling ran on
  TORCH_WORKER: torch work from two threads in one process.

    python benchmarks/app_thread_modes.py --out benchmarks/results/app_thread_modes.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
MODES = ("app", "threads", "main", "worker")


def one(mode: str) -> dict:
    import threading

    from app import handlers as h

    pool = ThreadPoolExecutor(1)
    on = (lambda f: pool.submit(f).result()) if mode == "worker" else (lambda f: f())
    studio = h.Studio(h.DEFAULT_BUNDLE)
    req = h.GenerateRequest(49, 1.5, steps=30, n=16, seed=1, sampler="DPM-Solver++ 2M SDE")
    if mode == "app":
        studio.warm()
        studio.generate_all(req)
        run = lambda: studio.generate_all(req)  # noqa: E731
    elif mode == "threads":  # the pre-session-12 app: each submission on a new thread (named so that nested calls
        class Fresh:      # run inline on it, as on the worker)
            def submit(self, fn, *args, **kwargs):
                box = {}
                t = threading.Thread(target=lambda: box.setdefault("v", fn(*args, **kwargs)), daemon=True,
                                     name=f"torch-worker-fresh-{time.perf_counter_ns()}")
                t.start()
                return type("Done", (), {"result": lambda self: (t.join(), box.get("v"))[1]})()
        h.TORCH_WORKER = Fresh()
        studio.warm()
        studio.generate_all(req)
        run = lambda: studio.generate_all(req)  # noqa: E731
    else:
        on(lambda: studio.warm.__wrapped__(studio))
        g = on(lambda: studio.guidance(req))
        plain = lambda: studio.score.__wrapped__(studio, studio._sample.__wrapped__(  # noqa: E731
            studio, req, g, lambda s: None, None), req.seed)
        run = lambda: on(plain)  # noqa: E731
    run()
    out = []
    for _ in range(4):
        t0 = time.perf_counter()
        run()
        out.append(time.perf_counter() - t0)
    return {"median_s": round(float(np.median(out)), 3), "runs_s": [round(v, 3) for v in out]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=MODES, default=None, help="(internal) time one mode in this process")
    p.add_argument("--out", default="benchmarks/results/app_thread_modes.json")
    a = p.parse_args()
    if a.mode:
        print(json.dumps(one(a.mode)))
        return
    from _common import machine, write

    res = {"machine": machine(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "modes": {}}
    for mode in MODES:
        r = subprocess.run([sys.executable, __file__, "--mode", mode], capture_output=True, text=True, check=True)
        res["modes"][mode] = json.loads(r.stdout.strip().splitlines()[-1])
        print(mode, res["modes"][mode], flush=True)
    write(Path(a.out), res)


if __name__ == "__main__":
    main()
