"""The evaluation report: density of generated sets against the real data and their quality against the
most unique real samples (Table 1 / Figures 3 and 6 of the paper), written as report.json, report.md and
density.png."""
from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from core.errors import DataError
from core.evaluation.metrics import (Features, avg_knn, check_images, fid, lof, precision_recall, rarity_score, top_unique)
from core.evaluation.neighbours import find_neighbours, near_copy_threshold


PROTOCOLS = ("single", "paper")


@dataclass(frozen=True)
class EvalSettings:
    features: str = "resnet50-random"  # density space (metrics.FEATURES): AvgkNN, LOF, Rarity, the baseline pick
    quality_features: Optional[str] = None  # FID, sFID, precision/recall space; None = the same as ``features``
    baseline_top: float = 0.1  # most unique real samples by AvgkNN: fraction in (0, 1] or count > 1
    k_knn: int = 5  # AvgkNN neighbours (PyOD KNN, method='mean')
    k_lof: int = 20  # LOF neighbours (PyOD LOF)
    k_rarity: int = 5  # Rarity Score real-ball k
    k_pr: int = 5  # improved precision/recall k
    seed: int = 0  # random feature network seed


@dataclass
class SetReport:
    """One generated set: summary numbers plus per-sample density scores (M,)."""

    name: str
    n: int
    fid: float
    sfid: float
    precision: float
    recall: float
    avgknn_mean: float
    lof_mean: float
    rarity_mean: float
    rarity_outside: int  # generated samples in no real k-NN ball (not in rarity_mean)
    near_copy_rate: float = 0.0  # share of samples closer to a real one than 99 % of real ones to theirs (neighbours.py)
    avgknn: np.ndarray = field(repr=False, default=None)
    lof: np.ndarray = field(repr=False, default=None)
    rarity: np.ndarray = field(repr=False, default=None)


@dataclass
class Report:
    settings: dict
    real_n: int
    baseline_n: int
    real_avgknn: np.ndarray
    real_lof: np.ndarray
    sets: list
    seconds: dict


def min_k(settings: EvalSettings) -> int:
    return max(settings.k_knn, settings.k_lof, settings.k_rarity, settings.k_pr) + 1


def evaluate_features(real: Features, generated: dict, settings: EvalSettings,
                      progress: Optional[Callable[[str], None]] = None,
                      quality: Optional[tuple[Features, dict]] = None) -> Report:
    """All metrics from features: real (N, D) and each generated set {name: Features} in the density space;
    ``quality`` = (real, {name: Features}) in a second space for FID, sFID and precision/recall (the paper's
    protocol: ResNet-50 for density and the baseline, Inception-v3 for quality), else the same space."""
    real_q, gen_q = quality if quality is not None else (real, generated)
    if not generated:
        raise DataError("no generated set to evaluate")
    need = min_k(settings)
    if real.pooled.shape[0] < need:
        raise DataError(f"the real set has {real.pooled.shape[0]} samples; these settings need at least {need} "
                        f"(k_lof={settings.k_lof} + 1)")
    say = progress or (lambda s: None)
    clock = {}
    t0 = time.perf_counter()
    say("density of the real data")
    real_knn, _ = avg_knn(real.pooled, None, settings.k_knn)
    real_lof, _ = lof(real.pooled, None, settings.k_lof)
    copy_threshold = near_copy_threshold(real.pooled)
    base = top_unique(real_knn, settings.baseline_top)
    if base.size < settings.k_pr + 1:
        raise DataError(f"--baseline-top {settings.baseline_top} keeps {base.size} real samples; precision/recall "
                        f"need at least {settings.k_pr + 1}")
    clock["real_density"] = time.perf_counter() - t0
    sets = []
    for name, g in generated.items():
        if g.pooled.shape[0] < settings.k_pr + 1:
            raise DataError(f"{name}: {g.pooled.shape[0]} samples; precision/recall need at least {settings.k_pr + 1}")
        t0 = time.perf_counter()
        say(f"{name}: density")
        _, g_knn = avg_knn(real.pooled, g.pooled, settings.k_knn)
        _, g_lof = lof(real.pooled, g.pooled, settings.k_lof)
        rar = rarity_score(real.pooled, g.pooled, settings.k_rarity)
        copies = find_neighbours(real.pooled, g.pooled, 1, copy_threshold).near_copy_rate
        say(f"{name}: FID, sFID, precision, recall against the {base.size} most unique real samples")
        q = gen_q[name]
        p, r = precision_recall(real_q.pooled[base], q.pooled, settings.k_pr)
        sets.append(SetReport(name=name, n=int(g.pooled.shape[0]), fid=fid(real_q.pooled[base], q.pooled),
                              sfid=fid(real_q.spatial[base], q.spatial), precision=p, recall=r,
                              avgknn_mean=float(g_knn.mean()), lof_mean=float(g_lof.mean()),
                              rarity_mean=rar.mean, rarity_outside=rar.outside, near_copy_rate=copies,
                              avgknn=g_knn, lof=g_lof,
                              rarity=rar.scores))
        clock[name] = time.perf_counter() - t0
    return Report(settings=asdict(settings), real_n=int(real.pooled.shape[0]), baseline_n=int(base.size),
                  real_avgknn=real_knn, real_lof=real_lof, sets=sets, seconds=clock)


def paper_spaces(channels: int, quality: Optional[str] = None, density: Optional[str] = None) -> tuple[str, str]:
    """--protocol paper: (density space, quality space) as the paper evaluates. Density, Rarity and the
    most-unique baseline in ResNet-50 (random init for grey / MRI data, as the paper did; ImageNet weights
    otherwise); FID, sFID, precision and recall in Inception-v3: the TF FID network when its weights are in
    the cache, else torchvision's ImageNet Inception. Offline without those weights: one line naming the
    missing files. ``density`` / ``quality`` (--density-features / --quality-features) override the choice,
    e.g. resnet50-random and inception-random for an offline stand-in."""
    import torch
    from torchvision.models import Inception_V3_Weights, ResNet50_Weights

    from core.errors import OfflineError
    from core.evaluation.metrics import FID_INCEPTION_FILES, fid_inception_file
    from core.maths.score import _offline

    hub = Path(torch.hub.get_dir()) / "checkpoints"
    if density is None:
        density = "resnet50-random" if channels == 1 else "resnet50"
        resnet = hub / ResNet50_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
        if density == "resnet50" and not resnet.is_file() and _offline():
            raise OfflineError(f"--protocol paper needs ResNet-50's ImageNet weights for colour data ({resnet.name} "
                               f"in {hub}), absent offline; pass --density-features resnet50-random for an offline "
                               "stand-in")
    if quality:
        return density, quality
    if fid_inception_file() is not None:
        return density, "inception-fid"
    tv = hub / Inception_V3_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    if tv.is_file() or not _offline():
        return density, "inception"
    raise OfflineError(f"--protocol paper needs Inception-v3 weights for FID, sFID and precision/recall: "
                       f"{FID_INCEPTION_FILES[0]} (pytorch-fid) or {tv.name} (torchvision) in {hub}, absent "
                       "offline; pass --quality-features inception-random for an offline stand-in, or use "
                       "--features for one space")


def check_sets(real: np.ndarray, generated: dict) -> None:
    """Every generated set: uint8 NHWC with the real images' H, W, C."""
    shape = check_images(real, "real").shape[1:]
    for name, g in generated.items():
        g = check_images(g, name)
        if g.shape[1:] != shape:
            raise DataError(f"{name}: images are {g.shape[1]}x{g.shape[2]}x{g.shape[3]}, the real images "
                            f"{shape[0]}x{shape[1]}x{shape[2]}; evaluate sets of one size")


def _finite(v) -> Optional[float]:
    return None if v is None or not np.isfinite(v) else round(float(v), 6)


def report_dict(report: Report, extra: Optional[dict] = None) -> dict:
    """JSON-ready: every number, the settings that produced it, and per-sample density scores."""
    rows = []
    for s in report.sets:
        rows.append({
            "name": s.name, "n": s.n, "fid": _finite(s.fid), "sfid": _finite(s.sfid),
            "precision": _finite(s.precision), "recall": _finite(s.recall),
            "avgknn_mean": _finite(s.avgknn_mean), "lof_mean": _finite(s.lof_mean),
            "rarity_mean": _finite(s.rarity_mean), "rarity_outside": s.rarity_outside,
            "near_copy_rate": _finite(s.near_copy_rate),
            "per_sample": {"avgknn": [_finite(v) for v in s.avgknn], "lof": [_finite(v) for v in s.lof],
                           "rarity": [_finite(v) for v in s.rarity]},
        })
    return {"settings": {**report.settings, **(extra or {})}, "real": {
        "n": report.real_n, "baseline_n": report.baseline_n,
        "avgknn_mean": _finite(report.real_avgknn.mean()), "lof_mean": _finite(report.real_lof.mean()),
        "per_sample": {"avgknn": [_finite(v) for v in report.real_avgknn],
                       "lof": [_finite(v) for v in report.real_lof]}},
        "sets": rows, "seconds": {k: round(v, 3) for k, v in report.seconds.items()}}


def _fmt(v, digits=3) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def report_markdown(report: Report, extra: Optional[dict] = None) -> str:
    s = report.settings
    lines = [
        "# Evaluation report", "",
        (f"Features: density, Rarity and the baseline in `{s['features']}`, FID, sFID, precision and recall in "
         f"`{s['quality_features']}` (the paper's protocol); " if s.get("quality_features") else
         f"Features: `{s['features']}`; ") + f"real data: {report.real_n} samples; quality baseline: the "
        f"{report.baseline_n} most unique real samples by AvgkNN (`--baseline-top {s['baseline_top']}`). "
        f"AvgkNN k={s['k_knn']}, LOF k={s['k_lof']}, Rarity k={s['k_rarity']}, precision/recall k={s['k_pr']}. "
        "Higher AvgkNN / LOF / Rarity = rarer; lower FID / sFID = closer to the baseline.", "",
        "| set | n | FID | sFID | Precision | Recall | AvgkNN | LOF | Rarity | outside | near-copy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| real (all) | {report.real_n} | | | | | {_fmt(report.real_avgknn.mean())} | "
        f"{_fmt(report.real_lof.mean())} | | | |",
    ]
    for r in report.sets:
        lines.append(f"| {r.name} | {r.n} | {_fmt(r.fid, 2)} | {_fmt(r.sfid, 2)} | {_fmt(r.precision)} | "
                     f"{_fmt(r.recall)} | {_fmt(r.avgknn_mean)} | {_fmt(r.lof_mean)} | {_fmt(r.rarity_mean)} | "
                     f"{r.rarity_outside} | {r.near_copy_rate:.1%} |")
    lines += ["", "`outside`: generated samples inside no real k-NN ball; they have no Rarity Score and are "
              "left out of its mean. `near-copy`: the share of generated samples closer to a real one (in the "
              "density space) than 99 % of the real samples are to their own nearest other real sample.", ""]
    if extra:
        lines += ["Inputs: " + ", ".join(f"{k} = `{v}`" for k, v in extra.items()), ""]
    return "\n".join(lines)


def kde_curve(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Gaussian KDE of the finite values (N,) on ``grid`` (G,); zeros when there is nothing to estimate."""
    from scipy.stats import gaussian_kde

    v = values[np.isfinite(values)]
    if v.size < 2 or np.ptp(v) == 0:
        return np.zeros_like(grid)
    return gaussian_kde(v)(grid)


def density_curves(values: dict, panels: list, title: Optional[str] = None, colours: Optional[dict] = None,
                   reference: str = "real data"):
    """A matplotlib figure of density curves (Figures 3 and 6): one panel per (key, x label) in ``panels``,
    one curve per series of ``values`` = {series: {key: (N,)}}; the ``reference`` series is dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = colours or {}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels) + 1, 4.0), dpi=105)
    for ax, (key, label) in zip(np.atleast_1d(axes), panels):
        allv = np.concatenate([np.asarray(v[key])[np.isfinite(v[key])] for v in values.values()])
        lo, hi = np.quantile(allv, [0.001, 0.995])
        grid = np.linspace(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo), 400)
        for name, v in values.items():
            x = np.asarray(v[key], np.float64)
            ref = name == reference
            ax.plot(grid, kde_curve(x, grid), color=colours.get(name, "black" if ref else None), linewidth=2,
                    linestyle="--" if ref else "-", label=f"{name} (n={len(x)}, mean {np.nanmean(x):.3g})")
        ax.set_xlabel(label)
        ax.set_ylabel("density")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def density_figure(report: Report) -> bytes:
    """PNG: density curves of AvgkNN and LOF for the real data and each generated set (Figures 3 and 6)."""
    import matplotlib.pyplot as plt

    values = {"real data": {"avgknn": report.real_avgknn, "lof": report.real_lof},
              **{s.name: {"avgknn": s.avgknn, "lof": s.lof} for s in report.sets}}
    fig = density_curves(values, [("avgknn", f"AvgkNN (k = {report.settings['k_knn']}): higher = rarer"),
                                  ("lof", f"LOF (k = {report.settings['k_lof']}): higher = rarer")],
                         f"Density against the real data in {report.settings['features']} feature space")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_report(report: Report, out: str | Path, extra: Optional[dict] = None) -> Path:
    """report.json, report.md and density.png in ``out``, each written atomically."""
    from core.nets.checkpoint import atomic_write_bytes, atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps(report_dict(report, extra), indent=1, allow_nan=False))
    atomic_write_text(out / "report.md", report_markdown(report, extra))
    atomic_write_bytes(out / "density.png", density_figure(report))
    return out


def load_npz_images(path: str | Path) -> np.ndarray:
    """uint8 images (N, H, W, C) from the ``images`` array of a .npz (as ``sample`` writes); never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z.files:
                raise DataError(f"{path}: no 'images' array (has: {', '.join(z.files) or 'nothing'})")
            images = z["images"]
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - zip, pickle-refusal and format errors alike
        raise DataError(f"{path}: not a readable .npz of images ({type(e).__name__}: {e})") from None
    return check_images(images, str(path))


def load_image_set(path: str | Path, size: Optional[int] = None, channels: Optional[int] = None,
                   progress: Optional[Callable[[int, int], None]] = None) -> tuple[np.ndarray, dict]:
    """uint8 NHWC images from a .npz, a bundle folder (its real data) or an image/NIfTI folder (loaded at
    ``size`` x ``size`` with ``channels``); returns (images, description with each image's ``paths``)."""
    from core.bundles.bundle import load_real
    from core.bundles.data import load_image_folder

    path = Path(path)
    if path.is_file():
        images = load_npz_images(path)
        return images, {"kind": "npz", "paths": [f"{path.name}:{i}" for i in range(len(images))]}
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder")
    if (path / "manifest.json").is_file():
        from core.bundles.bundle import check_bundle

        manifest = check_bundle(path)
        real = load_real(path)
        return check_images(real.images, str(path)), {"kind": "bundle", "name": manifest.get("name"), "paths": real.paths}
    if size is None or channels is None:
        raise DataError(f"{path}: an image folder needs a size; give a .npz or bundle first")
    s = load_image_folder(path, size, channels, progress=progress)
    if not len(s.paths):
        raise DataError(f"{path}: no readable images")
    images = np.ascontiguousarray(s.images.permute(0, 2, 3, 1).numpy())
    return images, {"kind": "folder", "skipped": len(s.skipped), "paths": list(s.paths), "rows": s.rows.numpy()}


def is_streamed(path: str) -> bool:
    """Whether ``--real`` names data to stream (a folder, datasets folder, Parquet or tar shards), not a .npz
    or a bundle (both held in memory as they are)."""
    p = Path(path)
    return not (p.is_file() and p.suffix == ".npz") and not (p.is_dir() and (p / "manifest.json").is_file())


@torch.no_grad()
def stream_features(extractors: list, source, batch_size: int = 64, device: str = "cpu", workers: int = 0,
                    progress: Optional[Callable[[int], None]] = None) -> tuple:
    """Features of every readable image of a streamed source (core.bundles.stream) in each extractor's space,
    the images decoded chunk by chunk and dropped once featurised (issue 28): (list of Features, names, slots
    (N,), skips). Only the feature matrices stay: N x D floats per space."""
    from core.bundles.stream import iterate
    from core.evaluation.metrics import Features

    pooled = [[] for _ in extractors]
    spatial = [[] for _ in extractors]
    names, slots, skipped, pending = [], [], [], []

    def run(batch):
        x = torch.from_numpy(np.concatenate([p.images for p in batch])).to(device).float() / 127.5 - 1
        for e, ex in enumerate(extractors):
            p, q = ex.fn(x)
            pooled[e].append(p.float().cpu().numpy())
            spatial[e].append(q.float().cpu().numpy())

    for piece in iterate(source, source.chunks, workers):
        skipped += piece.skipped
        if len(piece.slots):
            names += piece.names
            slots.append(piece.slots)
            pending.append(piece)
        if sum(len(p.slots) for p in pending) >= batch_size or (piece.last and pending):
            run(pending)
            pending = []
        if progress is not None:
            progress(len(piece.slots) + len(piece.skipped))
    if pending:
        run(pending)
    if not names:
        raise DataError(f"{source.spec}: no readable images")
    feats = [Features(np.concatenate(p), np.concatenate(q)) for p, q in zip(pooled, spatial)]
    for f, ex in zip(feats, extractors):
        if not (np.isfinite(f.pooled).all() and np.isfinite(f.spatial).all()):
            raise DataError(f"features from {ex.name} are not finite")
    return feats, names, np.concatenate(slots), skipped


class StreamedImages:
    """uint8 NHWC real images fetched by index from a streamed source (the few a neighbour sheet shows)."""

    def __init__(self, source, slots: np.ndarray):
        from core.bundles.random_access import LazyImages, RandomAccess

        self._images = LazyImages(RandomAccess(source), slots, cache_bytes=64 << 20)
        self.shape = (len(slots), source.size, source.size, source.channels)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i):
        one = np.isscalar(i) or np.ndim(i) == 0
        x = self._images[torch.as_tensor(np.atleast_1d(i))].permute(0, 2, 3, 1).numpy()
        return x[0] if one else x
