"""Rows of the build's distance x timestep sweep (core.bundles.demo.sweep_rows) on a bundle's own real data, e.g. to
re-measure one distance after a fix (issue 15: lpips-rand with uniform channel weights) without a rebuild.

The same subset rule as the build (600 seeded slices, 2 draws, t = 0.2 .. 0.8 T); rows of a distance the
manifest also holds are printed beside the manifest's value, so a reproduction of an unchanged distance
(e.g. l2) shows that the subset and the noise are the build's.

Usage: python benchmarks/sweep_rows.py [--bundle assets/mri-atrophy] [--distances lpips-rand,l2]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from core.bundles.bundle import load_bundle  # noqa: E402
from core.bundles.demo import DemoConfig, sweep_rows  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", default="assets/mri-atrophy")
    p.add_argument("--distances", default="lpips-rand,l2")
    p.add_argument("--n", type=int, default=None, help="slices (default: the build's, 600)")
    p.add_argument("--draws", type=int, default=None, help="noise draws (default: the build's, 2)")
    p.add_argument("--t-fracs", default=None, help="timesteps as fractions of T (default: the build's 0.2,0.4,0.6,0.8)")
    p.add_argument("--out", default="benchmarks/results/sweep_rows.json")
    a = p.parse_args()
    b = load_bundle(a.bundle)
    cfg, sweep = DemoConfig(), b.manifest.get("sweep") or {}
    old = {(r["distance"], r["t"]): r["spearman"] for r in sweep.get("rows", [])}
    images = torch.from_numpy(b.real.images).permute(0, 3, 1, 2).contiguous()
    t0 = time.perf_counter()
    seed = int((b.manifest.get("seeds") or {}).get("data", cfg.seed))
    t_fracs = [float(v) for v in a.t_fracs.split(",")] if a.t_fracs else cfg.sweep_t
    n = a.n or int(sweep.get("n", cfg.sweep_n))
    draws = a.draws or int(sweep.get("draws", 2))
    same = n == int(sweep.get("n", cfg.sweep_n)) and draws == int(sweep.get("draws", 2))
    _, rows = sweep_rows(b.model, images, b.real.truth, a.distances.split(","), t_fracs, n, seed, draws)
    for r in rows:
        r["manifest"] = old.get((r["distance"], r["t"])) if same else None
        print(f"{r['distance']:10s} t={r['t']:4d}: Spearman {r['spearman']:+.3f}"
              + (f" (bundle manifest: {r['manifest']:+.3f})" if r["manifest"] is not None else ""), flush=True)
    out = {"bundle": a.bundle, "n": n, "draws": draws, "seconds": time.perf_counter() - t0, "rows": rows}
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
