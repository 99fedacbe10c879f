"""Issue 28.2: peak memory and throughput of `score` as the data grows, folder and tar-shard inputs.

For each N: N generated colour images at 64x64 (smooth random ellipses on a gradient, PNG), written once as a
flat folder and as WebDataset shards of 1000; then `python -m core score` with a tiny untrained 64x64 model, l2,
one draw, in a subprocess whose memory (PSS, its own plus its DataLoader workers') is sampled every 0.1 s. The
reference row is `load_image_folder`, which holds every image at once (what `score` did before issue 28).

    python benchmarks/stream_memory.py --sizes 10000,50000,200000 --work /tmp/stream_mem \
        --out docs/results/stream_memory
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_images(folder: Path, shards: Path, n: int, seed: int = 0) -> None:
    """``n`` PNGs in ``folder`` and the same bytes in ``shards``/part-NNNNN.tar (1000 per shard); kept if done."""
    import webdataset as wds
    from PIL import Image, ImageDraw

    if (folder / ".done").is_file() and (shards / ".done").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    shards.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, 64)[None, :, None]
    writer = None
    for i in range(n):
        if i % 1000 == 0:
            if writer is not None:
                writer.close()
            writer = wds.TarWriter(str(shards / f"part-{i // 1000:05d}.tar"))
        c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        img = Image.fromarray((c0 * (1 - ramp) + c1 * ramp).repeat(64, 0).astype(np.uint8))
        d = ImageDraw.Draw(img)
        for _ in range(3):
            x, y, r = rng.integers(0, 64, 2).tolist() + [int(rng.integers(4, 20))]
            d.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        (folder / f"img{i:07d}.png").write_bytes(buf.getvalue())
        writer.write({"__key__": f"img{i:07d}", "png": buf.getvalue()})
    writer.close()
    (folder / ".done").write_text("")
    (shards / ".done").write_text("")


def peak_rss(cmd: list, env: dict) -> tuple:
    """(peak memory in MiB of the process and its children, seconds, return code) of ``cmd``: the sum of their
    PSS (proportional set size: pages a forked DataLoader worker shares with its parent are counted once)."""
    import psutil

    import tempfile

    t0 = time.perf_counter()
    # stderr (progress bars) goes to a file: a pipe read only at the end fills up on a long run and blocks the child
    err_file = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err_file, text=True)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            rss = ps.memory_full_info().pss + sum(c.memory_full_info().pss for c in ps.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.1)
    err_file.seek(0)
    err = err_file.read()
    err_file.close()
    if proc.returncode != 0:
        print(err[-2000:], file=sys.stderr)
    return peak / 2**20, time.perf_counter() - t0, proc.returncode


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="10000,50000,200000")
    p.add_argument("--work", default="/tmp/stream_mem")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", default="docs/results/stream_memory")
    a = p.parse_args()
    work, out = Path(a.work), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    model = work / "model"
    rows_path = out / "rows.json"
    rows = json.loads(rows_path.read_text()) if rows_path.exists() else []
    for n in (int(v) for v in a.sizes.split(",")):
        folder, shards = work / f"folder_{n}", work / f"shards_{n}"
        t0 = time.perf_counter()
        make_images(folder, shards, n)
        print(f"N={n}: data ready ({time.perf_counter() - t0:.0f} s)", flush=True)
        if not (model / "model.safetensors").is_file():
            subprocess.run([sys.executable, "-m", "core", "train-diffusion", "--data", str(folder), "--out", str(model),
                            "--steps", "1", "--size", "64", "--channels", "3", "--widths", "8,16", "--batch-size", "8",
                            "--no-attention"], env=env, cwd=ROOT, check=True, capture_output=True)
        for kind, spec in (("folder", str(folder)), ("tar shards", str(shards / "part-*.tar"))):
            if any(r["n"] == n and r["input"] == kind for r in rows):
                continue
            cmd = [sys.executable, "-m", "core", "score", "--model", str(model), "--data", spec, "--out",
                   str(work / f"scores_{n}.csv"), "--distance", "l2", "--draws", "1", "--batch-size", "64",
                   "--workers", str(a.workers)]
            mib, sec, rc = peak_rss(cmd, env)
            row = {"n": n, "input": kind, "peak_pss_mib": round(mib, 1), "seconds": round(sec, 1),
                   "images_per_s": round(n / sec, 1), "rc": rc, "workers": a.workers}
            rows.append(row)
            rows_path.write_text(json.dumps(rows, indent=1) + "\n")
            print(row, flush=True)
        if not any(r["n"] == n and r["input"] == "load_image_folder (all in memory, loading only)" for r in rows) and n <= 50000:
            code = (f"from core.bundles.data import load_image_folder; d = load_image_folder({str(folder)!r}, 64, 3); "
                    f"print(d.images.shape)")
            mib, sec, rc = peak_rss([sys.executable, "-c", code], env)
            row = {"n": n, "input": "load_image_folder (all in memory, loading only)", "peak_pss_mib": round(mib, 1),
                   "seconds": round(sec, 1), "images_per_s": round(n / sec, 1), "rc": rc, "workers": 0}
            rows.append(row)
            rows_path.write_text(json.dumps(rows, indent=1) + "\n")
            print(row, flush=True)
    _report(out, rows)


def _report(out: Path, rows: list) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["| N | input | peak PSS (MiB) | seconds | images/s |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["input"], r["n"])):
        lines.append(f"| {r['n']:,} | {r['input']} | {r['peak_pss_mib']:.0f} | {r['seconds']:.0f} | "
                     f"{r['images_per_s']:.0f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for kind in sorted({r["input"] for r in rows}):
        pts = sorted((r["n"], r["peak_pss_mib"], r["seconds"]) for r in rows if r["input"] == kind)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=kind)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=kind)
    axes[0].set(xlabel="images", ylabel="peak PSS (MiB)", title="score: peak memory")
    axes[1].set(xlabel="images", ylabel="seconds", title="score: wall time (linear is the goal)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:g}K"))
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
