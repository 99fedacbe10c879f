"""``build-demo``: the whole pipeline on the MRI phantom, written as a bundle (see core/bundle.py).

Stages (each skipped when its output already exists in the work folder, so a killed build resumes):
phantom data -> diffusion model -> distance/timestep sweep on a subset (Spearman vs the true
severity) -> minority score of all images with the best setting -> L quantile classes ->
minority classifier -> 2-D map (PCA, then UMAP when umap-learn is installed) -> bundle.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .bundle import BUNDLE_FILES, BUNDLE_SCHEMA, sha256_file
from .checkpoint import atomic_write_bytes, atomic_write_json, atomic_write_text, save_tensors

Log = Callable[[str], None]
SWEEP_VERSION = 2  # 2: lpips-rand with uniform channel weights (issue 15); a work folder's older sweep is redone
Progress = Callable[[str, int, int, dict], None]


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


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def read_metadata(data_dir: Path) -> dict[str, float]:
    with open(data_dir / "metadata.csv", newline="", encoding="utf-8") as f:
        return {r["path"]: float(r["severity"]) for r in csv.DictReader(f)}


def two_d_map(images: np.ndarray, seed: int, log: Log, method: str = "umap") -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """PCA(50) of the pixels, then UMAP to 2-D (PCA's first two components without umap-learn)."""
    x = images.reshape(len(images), -1).astype(np.float32) / 255.0
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = vt[:50].astype(np.float32)
    z = (x - mean) @ comps.T
    if method == "pca":
        return z[:, :2].astype(np.float32), mean.astype(np.float32), comps, "pca2"
    try:
        import umap

        coords = umap.UMAP(n_components=2, n_neighbors=30, min_dist=0.1, random_state=seed).fit_transform(z)
        method = "umap(pca50)"
    except ImportError:
        log("umap-learn is not installed: the 2-D map is the first two PCA components")
        coords, method = z[:, :2], "pca2"
    return coords.astype(np.float32), mean.astype(np.float32), comps, method


def sweep_rows(model, images: torch.Tensor, truth: np.ndarray, distances, t_fracs, n: int, seed: int,
               draws: int = 2, log: Optional[Log] = None) -> tuple[np.ndarray, list]:
    """The build's distance x timestep sweep: Spearman(minority score, truth) on a seeded subset of ``n`` of the
    uint8 images (N, C, H, W) for each distance and t = frac * T; returns (subset indices, rows)."""
    from .score import ScoreSettings, make_distance, minority_scores

    rng = np.random.default_rng(seed)
    sub = np.sort(rng.choice(len(images), size=min(n, len(images)), replace=False))
    sub_t = torch.as_tensor(sub)
    rows = []
    for dist_name in distances:
        dist = make_distance(dist_name, seed=seed, model=model)
        for frac in t_fracs:
            st = ScoreSettings(distance=dist_name, t=int(round(frac * model.schedule.T)), draws=draws, seed=seed)
            s = minority_scores(model, images[sub_t], sub_t, st, dist, batch_size=128)
            rows.append({"distance": dist_name, "t_frac": frac, "t": st.t, "spearman": spearman(s, truth[sub])})
            if log is not None:
                log(f"   {dist_name:10s} t={st.t:4d}: Spearman {rows[-1]['spearman']:+.3f}")
    return sub, rows


def build_demo(out: str | Path, work: str | Path, cfg: DemoConfig, log: Log, progress: Optional[Progress] = None) -> dict:
    from .categorize import fit_labels
    from .data import load_image_folder
    from .models import ClassifierConfig, UNetConfig, load_classifier, load_diffusion
    from .phantom import build_mri_phantom
    from .score import ScoreSettings, make_distance, minority_scores, resolve_t
    from .train import ClassifierTrainConfig, DiffusionTrainConfig, train_classifier, train_diffusion

    out, work = Path(out), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    report = lambda stage: (lambda i, n, m=None: progress(stage, i, n, m or {})) if progress else None  # noqa: E731
    data_dir = work / "data"
    if not (data_dir / "metadata.csv").is_file():
        log(f"1/6 phantom data: {cfg.n} slices at {cfg.size}x{cfg.size}")
        build_mri_phantom(data_dir, cfg.n, cfg.size, cfg.seed, progress=report("phantom"))
    data = load_image_folder(data_dir, cfg.size, 1)
    truth_by_path = read_metadata(data_dir)
    severity = np.array([truth_by_path[p] for p in data.paths], dtype=np.float32)

    run = work / "run"
    state = run / "train_state.safetensors"
    done_steps = json.loads((run / "model.json").read_text()).get("step", 0) if (run / "model.json").is_file() else 0
    if done_steps < cfg.diffusion_steps:
        log(f"2/6 diffusion model: {cfg.diffusion_steps} steps (resuming at {done_steps})" if done_steps else
            f"2/6 diffusion model: {cfg.diffusion_steps} steps")
        train_diffusion(data, run, DiffusionTrainConfig(steps=cfg.diffusion_steps, batch_size=32, seed=cfg.seed,
                                                        save_every=250, unet=UNetConfig(cfg.size, 1, tuple(cfg.widths))),
                        resume=state.is_file(), progress=report("diffusion"))
    model = load_diffusion(run)

    sweep_path = work / "sweep.json"
    if sweep_path.is_file():  # a sweep of other distances, timesteps or size is redone, not reused
        old = json.loads(sweep_path.read_text())
        done = ({r["distance"] for r in old.get("rows", [])}, {float(r["t_frac"]) for r in old.get("rows", [])},
                old.get("n"))
        want = (set(cfg.sweep_distances), {float(f) for f in cfg.sweep_t}, min(cfg.sweep_n, len(data)))
        if done != want or old.get("version") != SWEEP_VERSION:
            log("   sweep settings changed since the last run: sweeping again")
            sweep_path.unlink()
    if not sweep_path.is_file():
        log(f"3/6 distance x timestep sweep on {cfg.sweep_n} images")
        sub, rows = sweep_rows(model, data.images, severity, cfg.sweep_distances, cfg.sweep_t, cfg.sweep_n, cfg.seed,
                               log=log)
        atomic_write_json(sweep_path, {"n": int(len(sub)), "draws": 2, "rows": rows, "version": SWEEP_VERSION})
    sweep = json.loads(sweep_path.read_text())
    best = max(sweep["rows"], key=lambda r: r["spearman"])

    scores_path, scores_meta = work / "scores.npy", work / "scores.json"
    t_final = int(best["t"]) if cfg.score_t is None else resolve_t(cfg.score_t, model.schedule.T, "--score-t")
    settings = ScoreSettings(distance=cfg.score_distance or best["distance"], t=t_final, draws=cfg.draws, seed=cfg.seed)
    if scores_meta.is_file() and json.loads(scores_meta.read_text()) != settings.to_dict():
        log("   score settings changed since the last run: rescoring")
        scores_path.unlink(missing_ok=True)
    if not scores_path.is_file():
        log(f"4/6 minority score of {len(data)} images: {settings.distance}, t={settings.t}, {settings.draws} draws")
        scores = minority_scores(model, data.images, torch.arange(len(data)), settings,
                                 make_distance(settings.distance, seed=cfg.seed, model=model), batch_size=128,
                                 progress=report("score"))
        buf = io.BytesIO()
        np.save(buf, scores, allow_pickle=False)
        atomic_write_bytes(scores_path, buf.getvalue())
        atomic_write_json(scores_meta, settings.to_dict())
    scores = np.load(scores_path, allow_pickle=False)
    thresholds, labels = fit_labels(scores, cfg.classes)
    rho_full = spearman(scores, severity)
    log(f"   Spearman(score, severity) on all {len(data)} images: {rho_full:+.3f}")

    clf_dir = work / "classifier"
    if (clf_dir / "classifier.json").is_file():
        info = json.loads((clf_dir / "classifier.json").read_text())
        net = info.get("config", {})
        if (info.get("score_settings"), info.get("steps"), net.get("base_channels"), net.get("num_outputs")) != (
                settings.to_dict(), cfg.clf_steps, cfg.clf_base_channels, cfg.classes):
            log("   classifier was trained for other labels or settings: retraining")
            (clf_dir / "classifier.json").unlink()
    if not (clf_dir / "classifier.json").is_file():
        log(f"5/6 minority classifier: L={cfg.classes}, {cfg.clf_steps} steps")
        ccfg = ClassifierTrainConfig(steps=cfg.clf_steps, batch_size=cfg.clf_batch, seed=cfg.seed, eval_every=250,
                                     net=ClassifierConfig(cfg.size, 1, cfg.classes, base_channels=cfg.clf_base_channels))
        train_classifier(data, labels, model.schedule, clf_dir, ccfg, thresholds.tolist(),
                         {"score_settings": settings.to_dict()}, progress=report("classifier"))
    clf = load_classifier(clf_dir)

    log("6/6 2-D map and bundle")
    images_nhwc = data.images.permute(0, 2, 3, 1).numpy()
    coords, pca_mean, pca_comps, map_method = two_d_map(images_nhwc, cfg.seed, log, cfg.map_method)
    out.mkdir(parents=True, exist_ok=True)
    for src, names in ((run, ("model.json", "model.safetensors")), (clf_dir, ("classifier.json", "classifier.safetensors"))):
        for name in names:
            atomic_write_bytes(out / name, (src / name).read_bytes())
    save_tensors(out / "real.safetensors", {
        "images": torch.from_numpy(np.ascontiguousarray(images_nhwc)), "score": torch.from_numpy(scores.astype(np.float32)),
        "label": torch.from_numpy(labels), "severity": torch.from_numpy(severity), "coords": torch.from_numpy(coords),
        "pca_mean": torch.from_numpy(pca_mean), "pca_components": torch.from_numpy(pca_comps)})
    table = io.StringIO()
    w = csv.writer(table, lineterminator="\n")
    w.writerow(["path", "score", "label", "severity", "x", "y"])
    for i, p in enumerate(data.paths):
        w.writerow([p, f"{scores[i]:.6g}", int(labels[i]), f"{severity[i]:.5f}", f"{coords[i, 0]:.4f}", f"{coords[i, 1]:.4f}"])
    atomic_write_text(out / "real.csv", table.getvalue())
    manifest = {
        "schema_version": BUNDLE_SCHEMA, "name": "mri-atrophy",
        "dataset": {"name": "mri-phantom", "n": len(data), "seed": cfg.seed, "source": "nilearn MNI152 templates",
                    "ground_truth": "severity in [0, 1]"},
        "image_size": cfg.size, "channels": 1, "schedule": model.schedule.name, "T": model.schedule.T,
        "num_classes": cfg.classes, "thresholds": thresholds.tolist(),
        "score": {**settings.to_dict(), "spearman_vs_severity": rho_full}, "sweep": sweep,
        "training": {"diffusion_steps": cfg.diffusion_steps, "widths": list(cfg.widths), "classifier_steps": cfg.clf_steps,
                     "classifier_base_channels": cfg.clf_base_channels, "classifier_metrics": clf.info.get("metrics")},
        "map": map_method, "seeds": {"data": cfg.seed, "training": cfg.seed, "score": cfg.seed},
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
        "versions": _versions(),
        "files": {name: sha256_file(out / name) for name in BUNDLE_FILES},
    }
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "diffusers", "accelerate", "numpy", "nilearn", "nibabel", "umap-learn", "lpips"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out
