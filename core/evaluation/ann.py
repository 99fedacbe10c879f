"""Nearest neighbours among many real images (issue 28): the exact block search of ``neighbours.nearest`` or an
approximate HNSW graph from faiss (``--index hnsw``), behind one function.

Exact search costs M x N distances and the near-copy threshold's leave-one-out pass N x N: fine at tens of
thousands of real images, hours at a million. An HNSW graph (Malkov & Yashunin) answers each query in about
log N; its recall against the exact search is measured by ``benchmarks/ann_recall.py`` (docs/RESULTS.md).
Distances are Euclidean in both, so thresholds and reports mean the same thing.
"""
from __future__ import annotations

import numpy as np

INDEXES = ("exact", "hnsw")
HNSW_LINKS = 32  # neighbours per graph node (faiss's M)
HNSW_BUILD = 80  # efConstruction
HNSW_SEARCH = 128  # efSearch: candidates kept per query (at least 2k)


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("--index hnsw needs faiss (pip install faiss-cpu; it is in requirements.txt)") from None
    return faiss


class HNSW:
    """An HNSW graph over ``base`` (N, D) float: ``search(queries (M, D), k)`` -> (indices (M, k) int64,
    Euclidean distances (M, k)), nearest first. faiss draws the graph's levels from its own fixed seed, so a
    graph over the same rows answers the same."""

    def __init__(self, base: np.ndarray):
        faiss = _faiss()
        base = np.ascontiguousarray(base, dtype=np.float32)
        self.n, self.dim = base.shape
        self.index = faiss.IndexHNSWFlat(self.dim, HNSW_LINKS)
        self.index.hnsw.efConstruction = HNSW_BUILD
        self.index.add(base)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self.index.hnsw.efSearch = max(HNSW_SEARCH, 2 * k)
        d2, idx = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return idx.astype(np.int64), np.sqrt(np.maximum(d2, 0.0)).astype(np.float64)


def knn(base: np.ndarray, queries: np.ndarray, k: int, index: str = "exact", graph: "HNSW | None" = None) -> tuple:
    """The k nearest rows of ``base`` (N, D) for each row of ``queries`` (M, D): (indices (M, k), distances
    (M, k)); ``index`` 'exact' (block search) or 'hnsw' (``graph`` reused when given)."""
    if index not in INDEXES:
        raise ValueError(f"unknown index {index!r}; allowed: {', '.join(INDEXES)}")
    if index == "exact":
        from core.evaluation.neighbours import nearest

        return nearest(base, queries, k)
    graph = graph or HNSW(base)
    return graph.search(queries, k)


def loo_radii(base: np.ndarray, k: int, index: str = "exact") -> np.ndarray:
    """Each row's distance to its k-th nearest *other* row (N,): exact (``metrics.knn_radii``) or through an
    HNSW graph queried with k + 1 (the row itself dropped by index; where the graph misses it, the k-th of the
    rest)."""
    if index not in INDEXES:
        raise ValueError(f"unknown index {index!r}; allowed: {', '.join(INDEXES)}")
    if index == "exact":
        from core.evaluation.metrics import knn_radii

        return knn_radii(base, k)
    idx, dist = HNSW(base).search(base, k + 1)
    own = idx == np.arange(len(base))[:, None]
    out = np.empty(len(base))
    for i in range(len(base)):
        out[i] = dist[i][~own[i]][k - 1]
    return out
