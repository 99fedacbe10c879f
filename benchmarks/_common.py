"""Shared pieces of the benchmark scripts: a synthetic long-tailed image set and a timer."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_long_tailed(folder: Path, n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Grey discs whose radius is long-tailed; 5 % also carry a second blob. Returns the rarity truth (n,)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    truth = np.empty(n)
    for i in range(n):
        r = size * (0.3 - 0.18 * min(rng.exponential(0.15), 1.0))  # mostly big, a tail of small discs
        cx, cy = size / 2 + rng.normal(0, 1.5, 2)
        img = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r) * 180.0 + 30
        blob = rng.random() < 0.05
        if blob:
            bx, by = rng.integers(3, size - 3, 2)
            img[(xx - bx) ** 2 + (yy - by) ** 2 < 4] = 255
        img += rng.normal(0, 6, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.png")
        truth[i] = (0.3 * size - r) / size + blob
    return truth


def machine() -> dict:
    return {"device": "cuda" if torch.cuda.is_available() else "cpu",
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int = 3) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs (after one warm-up)."""
    fn()
    sync()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return float(np.median(out))


def write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
