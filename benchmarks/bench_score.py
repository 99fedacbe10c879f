"""Minority-score throughput (images/s) and how it scales from 1k to 10k images.

Usage: python benchmarks/bench_score.py [--sizes 1000,2500,5000,10000] [--out benchmarks/results/score.json]
The backbone is the built-in UNet (widths 32,64,64, 32x32 grey); its weights do not change the cost.
Also times categorisation (quantiles + searchsorted) to show it is not O(N^2).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, sync, write  # noqa: E402

from core.maths.categorize import fit_labels  # noqa: E402
from core.nets.models import DiffusionModel, UNetConfig, build_unet  # noqa: E402
from core.maths.schedule import make_schedule  # noqa: E402
from core.maths.score import ScoreSettings, make_distance, minority_scores  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="1000,2500,5000,10000")
    p.add_argument("--distances", default="l2,lpips-rand")
    p.add_argument("--draws", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", default="benchmarks/results/score.json")
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    cfg = UNetConfig(32, 1, (32, 64, 64))
    model = DiffusionModel(build_unet(cfg), make_schedule("linear"), 32, 1).to(device).eval().requires_grad_(False)
    rows = []
    sizes = [int(s) for s in a.sizes.split(",")]
    for dist_name in a.distances.split(","):
        dist = make_distance(dist_name, device, model=model)
        for n in sizes if dist_name == "l2" else sizes[:1] + sizes[-1:]:
            images = torch.randint(0, 256, (n, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
            settings = ScoreSettings(distance=dist_name, t=600, draws=a.draws, seed=0)
            sync()
            t0 = time.perf_counter()
            scores = minority_scores(model, images, torch.arange(n), settings, dist, batch_size=a.batch_size)
            sync()
            t_score = time.perf_counter() - t0
            t0 = time.perf_counter()
            fit_labels(scores, 50)
            t_cat = time.perf_counter() - t0
            rows.append({"distance": dist_name, "n": n, "draws": a.draws, "seconds": t_score,
                         "images_per_s": n / t_score, "ms_per_image": 1000 * t_score / n, "categorize_s": t_cat})
            print(f"{dist_name:10s} n={n:6d}  {n / t_score:8.1f} img/s  {1000 * t_score / n:6.2f} ms/img  "
                  f"categorise {t_cat * 1000:.2f} ms", flush=True)
    write(Path(a.out), {"machine": machine(), "backbone": "UNet2DModel widths 32,64,64 (1.11M params), 32x32x1",
                        "batch_size": a.batch_size, "rows": rows})


if __name__ == "__main__":
    main()
