"""How much of the MRI phantom's severity can be seen in its 32x32 slices, before any model is trained.

For each rendering variant (atrophy magnitudes at severity 1 and the slice band) it builds ``--n`` slices
with ``core.demos.phantom`` and ranks them by a model-free uniqueness: the mean pixel distance to the 5 nearest
other slices. Spearman of that with the true severity, on all slices, on the mild ones (severity < 0.25,
most of the data) and on the rest, tells whether the minority score can possibly track severity: if mild
atrophy moves a slice by less than a pixel, nothing ranks the mild slices and the overall Spearman is
capped near 0.45 (``ceiling`` row: exact ranks above 0.25, random below).

Usage: python benchmarks/phantom_visibility.py [--n 3000] [--variants 6/3/4,9/7/10] [--out benchmarks/results/phantom_visibility.json]
A variant is VENTRICLE/SULCUS/THINNING in mm at severity 1, optionally @ZLO-ZHI for the slice band.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write  # noqa: E402

import core.demos.phantom as phantom  # noqa: E402

MILD = 0.25


def slices(n: int, seed: int, band: tuple[int, int], size: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8-derived float (n, size*size) in [0, 1] and severity (n,), drawn as build_mri_phantom draws them."""
    tpl = phantom._templates()
    maps = {z: phantom.slice_maps(tpl, z) for z in range(band[0], band[1] + 1)}
    rng = np.random.default_rng(seed)
    severity = phantom.draw_severity(rng, n)
    zs = rng.integers(band[0], band[1] + 1, n)
    imgs = [phantom.make_sample(maps[int(zs[i])], float(severity[i]), rng, size)[0] for i in range(n)]
    return np.stack(imgs).reshape(n, -1).astype(np.float32) / 255, severity


def knn_distance(x: np.ndarray, k: int = 5) -> np.ndarray:
    """Mean Euclidean distance of each row of x (N, D) to its k nearest other rows."""
    t = torch.from_numpy(x)
    out = []
    for s in range(0, len(t), 1024):
        d = torch.cdist(t[s:s + 1024], t)
        out.append(d.topk(k + 1, largest=False).values[:, 1:].mean(1))
    return torch.cat(out).numpy()


def rho(a, b) -> float:
    return float(spearmanr(a, b).statistic)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default="6/3/4,9/7/10,6/3/4@85-95,8/6/8,6/8/10,12/6/8")
    p.add_argument("--out", default="benchmarks/results/phantom_visibility.json")
    a = p.parse_args()
    defaults = (phantom.MAX_VENTRICLE_MM, phantom.MAX_SULCUS_MM, phantom.MAX_THINNING_MM)
    rows = []
    for spec in a.variants.split(","):
        mm, _, band = spec.partition("@")
        v, s, c = (float(x) for x in mm.split("/"))
        zb = tuple(int(z) for z in band.split("-")) if band else phantom.Z_BAND
        phantom.MAX_VENTRICLE_MM, phantom.MAX_SULCUS_MM, phantom.MAX_THINNING_MM = v, s, c
        t0 = time.perf_counter()
        x, sev = slices(a.n, a.seed, zb, a.size)
        u = knn_distance(x)
        mild = sev < MILD
        row = {"variant": spec, "ventricle_mm": v, "sulcus_mm": s, "thinning_mm": c, "z_band": list(zb),
               "spearman_all": rho(u, sev), "spearman_mild": rho(u[mild], sev[mild]),
               "spearman_rest": rho(u[~mild], sev[~mild]), "mild_share": float(mild.mean()),
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"{spec:16s} all {row['spearman_all']:+.3f}  severity<{MILD}: {row['spearman_mild']:+.3f}  "
              f"rest {row['spearman_rest']:+.3f}  ({row['seconds']:.0f} s)", flush=True)
    phantom.MAX_VENTRICLE_MM, phantom.MAX_SULCUS_MM, phantom.MAX_THINNING_MM = defaults
    rng = np.random.default_rng(a.seed)
    sev = phantom.draw_severity(rng, a.n)
    ceiling = rho(np.where(sev >= MILD, sev, MILD * rng.random(a.n)), sev)
    print(f"ceiling (exact ranks for severity >= {MILD}, random below): {ceiling:+.3f}")
    write(Path(a.out), {"machine": machine(), "n": a.n, "size": a.size, "seed": a.seed, "mild_below": MILD,
                        "rows": rows, "ceiling_exact_above_mild_random_below": ceiling})


if __name__ == "__main__":
    main()
