"""Nearest real neighbours of generated images and the near-copy rule (issue 18; the paper's Figure 24).

A generated image is a **near-copy** when its distance to the nearest real image is below the 1st percentile
of the real images' own nearest-neighbour distances (leave-one-out over the *distinct* real rows): closer to
some real image than 99 % of real images are to their nearest other real image. Exact duplicates among the
real images are counted once (issue 24.7): users' folders often hold a few, and with 2 % of them the
leave-one-out percentile fell to 0, so an exact copy of a real image (distance 0) was not flagged. Distances are computed in row blocks
(``metrics.distance_chunks``), never as an N x M matrix.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional

import numpy as np

from core.evaluation.metrics import CHUNK, check_features, distance_chunks

NEAR_COPY_PERCENTILE = 1.0  # percent of the real leave-one-out nearest-neighbour distances


@dataclass(frozen=True)
class Neighbours:
    """For M generated rows: ``indices`` (M, k) int64 real rows, nearest first; ``distances`` (M, k) float64;
    ``threshold`` the near-copy distance; ``near_copy`` (M,) bool."""

    indices: np.ndarray
    distances: np.ndarray
    threshold: float
    near_copy: np.ndarray

    @property
    def near_copy_rate(self) -> float:
        return float(self.near_copy.mean()) if len(self.near_copy) else 0.0


def nearest(real: np.ndarray, generated: np.ndarray, k: int, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest real rows of each generated row: (indices (M, k) int64, distances (M, k)); real (N, D),
    generated (M, D) float, in blocks of ``chunk`` generated rows."""
    real = check_features(real, "neighbours real", min_n=k)
    generated = check_features(generated, "neighbours generated")
    idx = np.empty((generated.shape[0], k), np.int64)
    dist = np.empty((generated.shape[0], k))
    for s, d in distance_chunks(generated, real, chunk):
        part = np.argpartition(d, k - 1, axis=1)[:, :k] if k < d.shape[1] else np.tile(np.arange(d.shape[1]), (len(d), 1))
        pd = np.take_along_axis(d, part, axis=1)
        order = np.argsort(pd, axis=1, kind="stable")
        idx[s:s + len(d)] = np.take_along_axis(part, order, axis=1)
        dist[s:s + len(d)] = np.take_along_axis(pd, order, axis=1)
    return idx, dist


def near_copy_threshold(real: np.ndarray, percentile: float = NEAR_COPY_PERCENTILE, index: str = "exact") -> float:
    """The ``percentile``-th percentile of the leave-one-out nearest-neighbour distances of the distinct real
    rows (real (N, D) float; exact duplicate rows counted once); ValueError with fewer than 2 distinct rows.
    ``index`` 'hnsw' finds the neighbours approximately (core.evaluation.ann)."""
    from core.evaluation.ann import loo_radii

    real = check_features(real, "near-copy real", min_n=2)
    distinct = np.unique(real, axis=0)
    if len(distinct) < 2:
        raise ValueError("the near-copy threshold needs at least 2 distinct real images")
    return float(np.percentile(loo_radii(distinct, 1, index), percentile))


def find_neighbours(real: np.ndarray, generated: np.ndarray, k: int = 5, threshold: Optional[float] = None,
                    index: str = "exact") -> Neighbours:
    """Nearest real neighbours and the near-copy flag of each generated row (features (N, D), (M, D)); ``index``
    'exact' or 'hnsw' (core.evaluation.ann: approximate, for a million real images)."""
    from core.evaluation.ann import knn

    if k < 1:
        raise ValueError(f"--k must be >= 1, got {k}")
    th = near_copy_threshold(real, index=index) if threshold is None else threshold
    idx, dist = knn(real, generated, k, index)
    return Neighbours(idx, dist, th, dist[:, 0] < th)


def neighbour_sheet(generated: np.ndarray, real: np.ndarray, nb: Neighbours, rows: slice, title: str = "") -> bytes:
    """A PNG (the paper's Figure 24): each generated uint8 image (NHWC) beside its k nearest real images, with
    distances; ``rows`` picks which generated images (at most 32 make a readable sheet)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = list(range(len(generated)))[rows]
    k = nb.indices.shape[1]
    fig, axes = plt.subplots(len(sel), k + 1, figsize=(1.3 * (k + 1), 1.35 * len(sel) + 0.6), squeeze=False)

    def show(ax, im):
        ax.imshow(im[..., 0] if im.shape[-1] == 1 else im, cmap="gray" if im.shape[-1] == 1 else None, vmin=0, vmax=255)
        ax.set_xticks([])
        ax.set_yticks([])

    for r, i in enumerate(sel):
        show(axes[r, 0], generated[i])
        axes[r, 0].set_ylabel(f"#{i}" + (" copy" if nb.near_copy[i] else ""), fontsize=7,
                              color="C3" if nb.near_copy[i] else "black")
        for j in range(k):
            show(axes[r, j + 1], real[nb.indices[i, j]])
            axes[r, j + 1].set_title(f"d={nb.distances[i, j]:.3g}", fontsize=6, pad=2)
    axes[0, 0].set_title("generated", fontsize=7, pad=2)
    fig.suptitle(title or f"nearest real images (near-copy: d < {nb.threshold:.3g})", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))  # room for the title above the first row
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
