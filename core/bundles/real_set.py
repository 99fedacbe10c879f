"""The build's passes over its real images in bounded memory (issue 28): what ``build`` needs of every image
without holding them all.

``scan`` reads the source once in slot order and keeps names, slots, class ids and a fingerprint of the decoded
pixels (the same digest ``build.fingerprint(images, paths)`` gives for the stacked set). ``fit_pca`` fits the 2-D
map's PCA basis on at most ``PCA_FIT_VALUES`` pixel values (every image where they fit, else a seeded subset).
``write_pass`` reads the source once more in slot order, deflates the images (N, H, W, C) into a file as they
come (the bundle's ``images_deflate``, one zlib stream, as ``bundle.pack_images`` makes it) and projects each
onto the basis. ``map_coords`` turns the (N, 50) projections into the 2-D map: UMAP fitted on at most
``UMAP_FIT`` of them, the rest placed by its ``transform``. ``score_streamed`` is the build's score stage on the
stream (``score_parts``: chunk by chunk, resumable). Held at once: one piece of images, the PCA subset,
and arrays of N rows (scores, labels, 50 projections, names).
"""
from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from core.bundles.stream import Source, in_order
from core.errors import DataError

PCA_FIT_VALUES = 1 << 25  # pixel values (128 MB as float32) the PCA basis is fitted on: the MRI's 6000 slices at
# 32x32 fit whole (the map as before), a 64x64 colour set uses a seeded subset of 2730 images
UMAP_FIT = 50_000  # points UMAP is fitted on; the others are placed by umap's transform
PCA_K = 50


@dataclass
class Scanned:
    """The readable rows of a source in slot order: names, slots int64 (N,), class ids int64 (N,) or None, skips
    [(name, reason)], and ``fingerprint``: sha256 (16 hex) of the decoded uint8 pixels in slot order and the names."""

    names: list
    slots: np.ndarray
    class_ids: Optional[np.ndarray]
    skipped: list
    fingerprint: str


def scan(source: Source, workers: int = 0, progress: Optional[Callable[[int], None]] = None) -> Scanned:
    """One pass over ``source`` keeping no pixels; ``progress(k)``: k more slots handled."""
    h = hashlib.sha256()
    names, slots, cls, skipped = [], [], [], []
    labelled = True
    for piece in in_order(source, workers):
        skipped += piece.skipped
        if len(piece.slots):
            h.update(np.ascontiguousarray(piece.images, dtype=np.uint8))
            names += piece.names
            slots.append(piece.slots)
            if piece.class_ids is None:
                labelled = False
            else:
                cls.append(piece.class_ids)
        if progress is not None:
            progress(len(piece.slots) + len(piece.skipped))
    if not names:
        first = skipped[0] if skipped else ("?", "nothing listed")
        raise DataError(f"--data {source.spec}: none of the {source.slots} images could be read (first problem: "
                        f"{first[0]}: {first[1]})")
    h.update(b"\0")
    h.update("\n".join(names).encode())
    h.update(b"\0")
    return Scanned(names, np.concatenate(slots), np.concatenate(cls) if labelled and cls else None, skipped,
                   h.hexdigest()[:16])


def fit_subset(n: int, values_per_image: int, seed: int) -> np.ndarray:
    """Sorted indices of the images the PCA basis is fitted on: all ``n`` when their pixels fit PCA_FIT_VALUES,
    else a seeded subset of as many as fit (at least 2)."""
    take = max(2, PCA_FIT_VALUES // max(1, values_per_image))
    if n <= take:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=take, replace=False))


def fit_pca(images_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), components (K, D)) float32 of uint8 images (n, H, W, C) scaled to [0, 1], K <= min(50, n, D): the
    leading right singular vectors of the centred pixels. With fewer images than pixel values they come from the
    n x n Gram matrix's eigenvectors (an SVD of the 2730 x 12288 subset of a 64x64 colour set peaked at 2.8 GB
    in LAPACK's workspace; this holds the centred pixels and n x n floats), else from the SVD as before."""
    x = images_nhwc.reshape(len(images_nhwc), -1).astype(np.float32)
    x /= 255.0
    mean = x.mean(0)
    x -= mean
    n, d = x.shape
    if n > d:
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        return mean.astype(np.float32), vt[:PCA_K].astype(np.float32)
    lam, u = np.linalg.eigh((x @ x.T).astype(np.float64))  # ascending; x x^T = U S^2 U^T
    keep = np.argsort(lam)[::-1][:PCA_K]
    keep = keep[lam[keep] > max(float(lam.max()), 1e-30) * 1e-10]  # directions with variance (never fewer than 1)
    comps = (x.T @ u[:, keep].astype(np.float32)) / np.sqrt(lam[keep]).astype(np.float32)  # v_k = X^T u_k / s_k
    return mean.astype(np.float32), np.ascontiguousarray(comps.T, dtype=np.float32)


def write_pass(source: Source, scanned: Scanned, mean: np.ndarray, comps: np.ndarray, deflate_to: Path,
               workers: int = 0, progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """Deflate every readable image (N, H, W, C) of ``source`` into ``deflate_to`` in slot order and return their
    PCA projections float32 (N, K). A DataError if the images are no longer the ``scanned`` ones (other names or
    pixels: the data changed since the scan)."""
    names = scanned.names
    z, seen, h = [], 0, hashlib.sha256()
    packer = zlib.compressobj(9)
    with open(deflate_to, "wb") as f:
        for piece in in_order(source, workers):
            if len(piece.slots):
                if piece.names != names[seen:seen + len(piece.names)]:
                    raise DataError(f"--data {source.spec}: changed while the bundle was built (at "
                                    f"{piece.names[0]!r}); build again")
                seen += len(piece.names)
                h.update(np.ascontiguousarray(piece.images, dtype=np.uint8))
                nhwc = np.ascontiguousarray(piece.images.transpose(0, 2, 3, 1))
                f.write(packer.compress(nhwc.tobytes()))
                x = nhwc.reshape(len(nhwc), -1).astype(np.float32) / 255.0
                z.append((x - mean) @ comps.T)
            if progress is not None:
                progress(len(piece.slots) + len(piece.skipped))
        f.write(packer.flush())
    h.update(b"\0")
    h.update("\n".join(names).encode())
    h.update(b"\0")
    if seen != len(names) or h.hexdigest()[:16] != scanned.fingerprint:
        raise DataError(f"--data {source.spec}: changed while the bundle was built ({seen} readable images now, "
                        f"{len(names)} when first read, or other pixels); build again")
    return np.concatenate(z).astype(np.float32)


def map_coords(z: np.ndarray, seed: int, log: Callable[[str], None], method: str = "umap") -> tuple[np.ndarray, str]:
    """2-D coordinates float32 (N, 2) of projections z (N, K): ``pca`` takes the first two components; ``umap``
    fits UMAP (30 neighbours, min_dist 0.1) on all of them, or on a seeded UMAP_FIT of them with the rest placed by
    ``transform``; without umap-learn, the first two components."""
    if method == "pca":
        return z[:, :2].astype(np.float32), "pca2"
    try:
        import umap
    except ImportError:
        log("umap-learn is not installed: the 2-D map is the first two PCA components")
        return z[:, :2].astype(np.float32), "pca2"
    reducer = umap.UMAP(n_components=2, n_neighbors=30, min_dist=0.1, random_state=seed)
    if len(z) <= UMAP_FIT:
        return reducer.fit_transform(z).astype(np.float32), "umap(pca50)"
    fit = np.sort(np.random.default_rng(seed).choice(len(z), size=UMAP_FIT, replace=False))
    coords = np.empty((len(z), 2), dtype=np.float32)
    coords[fit] = reducer.fit_transform(z[fit])
    rest = np.setdiff1d(np.arange(len(z)), fit)
    for lo in range(0, len(rest), 50_000):
        part = rest[lo:lo + 50_000]
        coords[part] = reducer.transform(z[part])
    log(f"   2-D map: UMAP fitted on {UMAP_FIT} of {len(z)} images, the rest placed by its transform")
    return coords, f"umap(pca50, fit on {UMAP_FIT})"


def counter(report: Optional[Callable], total: int) -> Optional[Callable[[int], None]]:
    """A ``progress(k)`` that adds k handled slots and reports (done, total) to a stage's ``report``."""
    if report is None:
        return None
    done = [0]

    def step(k: int) -> None:
        done[0] += k
        report(min(done[0], total), total)

    return step


def score_streamed(model, source, data, settings, distance, parts: Path, run: dict, workers: int,
                   report: Optional[Callable], log: Callable[[str], None]) -> np.ndarray:
    """Minority scores float32 (N,) of ``data``'s images in slot order, scored chunk by chunk into ``parts``
    (core.bundles.score_parts): a build killed while scoring keeps its complete chunks and scores the rest when
    rerun with the same ``run`` (model, data, settings); other parts are cleared. The caller removes ``parts``
    once the scores are saved."""
    from core.bundles.score_parts import merge, prepare, score_source

    try:
        done = prepare(parts, run, resume=True)
    except DataError:  # parts of other settings, model or data: start over
        done = prepare(parts, run, resume=False)
    if done:
        log(f"   resuming the score: {len(done)} of {len(source.chunks)} chunks already scored")
    todo = sum(c.size for c in source.chunks if c.index not in done)
    score_source(model, source, settings, distance, parts, done, batch_size=128, workers=workers,
                 progress=counter(report, todo))
    merged = merge(parts, source)
    if merged.names != list(data.paths):
        raise DataError(f"--data {source.spec}: the readable images changed while the bundle was built; build again")
    return merged.scores.astype(np.float32)  # minority_scores' float32, exactly (the parts hold them as JSON)
