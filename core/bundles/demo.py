"""``build-demo``: the MRI phantom (core/demos/phantom.py) written to the work folder, then ``build --truth severity``
(core/bundles/build.py) into the ``mri-atrophy`` bundle. Kept as the shortcut that reproduces the shipped bundle."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from core.bundles.build import SWEEP_VERSION, BuildConfig, Log, Progress, build_bundle, spearman, sweep_rows  # noqa: F401


@dataclass
class DemoConfig:
    n: int = 6000  # phantom images
    size: int = 32  # image side
    seed: int = 0
    diffusion_steps: int = 8000  # UNet optimiser steps (batch 32)
    widths: tuple = (32, 64, 64)  # UNet channels per level
    sweep_n: int = 600  # images in the distance / timestep sweep
    sweep_distances: tuple = ("l2", "l1", "ssim", "lpips-rand", "unet-feat")
    sweep_t: tuple = (0.2, 0.4, 0.6, 0.8)  # fractions of T
    draws: int = 20  # noise draws for the final score (5 draws gave a test-retest Spearman of only ~0.6)
    score_distance: Optional[str] = None  # final score's distance; None = the sweep's best
    score_t: Optional[float] = None  # final score's t: fraction of T in (0, 1) or an integer step; None = the sweep's best
    classes: int = 50  # L (paper's MRI setting)
    clf_steps: int = 6000
    clf_base_channels: int = 16
    clf_batch: int = 64
    map_method: str = "umap"  # umap (PCA 50 then UMAP) or pca (first two components; fast, for tests)

    def build_config(self) -> BuildConfig:
        """The ``build`` settings this demo stands for: grey, --truth severity, bundle name mri-atrophy."""
        return BuildConfig(
            size=self.size, channels=1, seed=self.seed, diffusion_steps=self.diffusion_steps, widths=tuple(self.widths),
            truth="severity", sweep_n=self.sweep_n, sweep_distances=tuple(self.sweep_distances),
            sweep_t=tuple(self.sweep_t), draws=self.draws, score_distance=self.score_distance, score_t=self.score_t,
            classes=self.classes, clf_steps=self.clf_steps, clf_base_channels=self.clf_base_channels,
            clf_batch=self.clf_batch, map_method=self.map_method, name="mri-atrophy", force=True,
            dataset={"name": "mri-phantom", "source": "nilearn MNI152 templates", "ground_truth": "severity in [0, 1]",
                     "phantom_n": self.n})


def build_demo(out: str | Path, work: str | Path, cfg: DemoConfig, log: Log, progress: Optional[Progress] = None) -> dict:
    from core.demos.phantom import build_mri_phantom

    work = Path(work)
    data_dir = work / "data"
    if not (data_dir / "metadata.csv").is_file():
        log(f"0/6 phantom data: {cfg.n} slices at {cfg.size}x{cfg.size}")
        report = (lambda i, n: progress("phantom", i, n, {})) if progress else None
        build_mri_phantom(data_dir, cfg.n, cfg.size, cfg.seed, progress=report)
    return build_bundle(data_dir, out, work, cfg.build_config(), log, progress)
