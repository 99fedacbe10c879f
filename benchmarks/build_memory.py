"""Issue 28.3: `build` on 10K, 50K and 200K images with bounded memory.

The generated 64x64 colour images of `benchmarks/stream_memory.py` (run it first, or pass --make to generate them),
built with tiny models and few steps (the real data sizes, not the real training lengths): widths 8,16, 50
diffusion and 50 classifier steps, l2 score with one draw, L = 50, the UMAP map (fitted on at most 50K, the rest
placed by its transform), one DataLoader worker. Memory is the peak PSS of the build and its worker, sampled every
0.1 s; the stage times come from the bundle's manifest.

    python benchmarks/build_memory.py --sizes 10000,50000,200000 --work /tmp/stream_mem --out docs/results/build_memory
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from stream_memory import make_images, peak_rss  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="10000,50000,200000")
    p.add_argument("--work", default="/tmp/stream_mem")
    p.add_argument("--out", default="docs/results/build_memory")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--map", default="umap", choices=["umap", "pca"])
    a = p.parse_args()
    work, out = Path(a.work), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    rows_path = out / "rows.json"
    rows = json.loads(rows_path.read_text()) if rows_path.exists() else []
    for n in (int(v) for v in a.sizes.split(",")):
        if any(r["n"] == n for r in rows):
            continue
        folder = work / f"folder_{n}"
        make_images(folder, work / f"shards_{n}", n)
        bundle = work / f"bundle_{n}"
        for old in (bundle, Path(f"{bundle}.work")):
            shutil.rmtree(old, ignore_errors=True)
        cmd = [sys.executable, "-m", "core", "build", "--data", str(folder), "--out", str(bundle), "--size", "64",
               "--channels", "3", "--widths", "8,16", "--diffusion-steps", "50", "--clf-steps", "50", "--draws", "1",
               "--score-distance", "l2", "--classes", "50", "--map", a.map, "--workers", str(a.workers)]
        t0 = time.perf_counter()
        mib, sec, rc = peak_rss(cmd, env)
        row = {"n": n, "peak_pss_mib": round(mib, 1), "seconds": round(sec, 1), "rc": rc, "workers": a.workers,
               "map": a.map}
        if rc == 0:
            manifest = json.loads((bundle / "manifest.json").read_text())
            row.update(stages=manifest["stage_seconds"], map_method=manifest["map"],
                       bundle_mb=round(sum(f.stat().st_size for f in bundle.iterdir()) / 1e6, 1),
                       real_safetensors_mb=round((bundle / "real.safetensors").stat().st_size / 1e6, 1),
                       images_held_whole_mib=round(n * 64 * 64 * 3 / 2**20, 1))
        rows.append(row)
        rows_path.write_text(json.dumps(rows, indent=1) + "\n")
        print(row, f"({time.perf_counter() - t0:.0f} s)", flush=True)
    _report(out, rows)


def _report(out: Path, rows: list) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((r for r in rows if r["rc"] == 0), key=lambda r: r["n"])
    stages = list(rows[0]["stages"]) if rows else []
    lines = ["| N | peak PSS (MiB) | the images as uint8 (MiB) | wall (s) | " + " | ".join(stages) + " | bundle (MB) |",
             "|---" * (5 + len(stages)) + "|"]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['peak_pss_mib']:.0f} | {r['images_held_whole_mib']:.0f} | {r['seconds']:.0f} | "
                     + " | ".join(f"{r['stages'].get(s, 0):.0f}" for s in stages) + f" | {r['bundle_mb']:.0f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ns = [r["n"] for r in rows]
    axes[0].plot(ns, [r["peak_pss_mib"] for r in rows], marker="o", label="build, peak PSS")
    axes[0].plot(ns, [r["images_held_whole_mib"] for r in rows], marker="x", ls="--",
                 label="the images alone, held as uint8")
    axes[0].set(xlabel="images", ylabel="MiB", title="build: peak memory")
    bottom = [0.0] * len(rows)
    for s in stages:
        vals = [r["stages"].get(s, 0) for r in rows]
        axes[1].bar([str(n // 1000) + "K" for n in ns], vals, bottom=bottom, label=s)
        bottom = [b + v for b, v in zip(bottom, vals)]
    axes[1].set(xlabel="images", ylabel="seconds", title="build: time per stage")
    axes[0].xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:g}K"))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
