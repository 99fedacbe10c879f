"""Issue 28.2: the approximate neighbour index (`neighbours --index hnsw`, faiss HNSW) against the exact search,
on 50K real images.

The images: benchmarks/stream_memory.py's generated colour images (smooth ellipses on gradients), read at 32x32;
their features: random-ResNet-50 pooled (2048-d, input 64 px, seed 0), streamed (core.evaluation.evaluate's
stream_features). 1000 rows are held out as queries (they stand for generated images), the other 49,000 are the
base. Measured: recall@1 and recall@5 of HNSW against the exact block search, the time of each, and the near-copy
threshold (1st percentile of the leave-one-out nearest-neighbour distances) both ways.

    python benchmarks/ann_recall.py --data /tmp/stream_mem/folder_50000 --out docs/results/ann_recall.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from core.bundles.stream import open_source  # noqa: E402
from core.evaluation.ann import HNSW, knn, loo_radii  # noqa: E402
from core.evaluation.evaluate import stream_features  # noqa: E402
from core.evaluation.metrics import make_extractor  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="/tmp/stream_mem/folder_50000")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--cache", default="/tmp/ann_features.npy")
    p.add_argument("--out", default="docs/results/ann_recall.json")
    a = p.parse_args()
    cache = Path(a.cache)
    if cache.is_file():
        feats = np.load(cache)
    else:
        t0 = time.perf_counter()
        ex = make_extractor("resnet50-random", seed=0, image_size=64)
        (f,), names, _, _ = stream_features([ex], open_source(a.data, 32, 3), batch_size=128, workers=a.workers)
        feats = f.pooled
        np.save(cache, feats)
        print(f"features of {len(feats)} images in {time.perf_counter() - t0:.0f} s", flush=True)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(feats))
    queries, base = feats[perm[:a.queries]], feats[perm[a.queries:]]
    out = {"n_base": len(base), "n_queries": len(queries), "dim": int(feats.shape[1]),
           "features": "resnet50-random pooled, 64 px input, images at 32x32"}
    t0 = time.perf_counter()
    exact, d_exact = knn(base, queries, 5, "exact")
    out["exact_search_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    graph = HNSW(base)
    out["hnsw_build_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    approx, d_approx = knn(base, queries, 5, "hnsw", graph=graph)
    out["hnsw_search_s"] = round(time.perf_counter() - t0, 3)
    out["recall_at_1"] = float(np.mean(approx[:, 0] == exact[:, 0]))
    out["recall_at_5"] = float(np.mean([len(set(x) & set(e)) / 5 for x, e in zip(approx, exact)]))
    out["nearest_distance_rel_err_max"] = float(np.max(np.abs(d_approx[:, 0] - d_exact[:, 0]) / d_exact[:, 0]))
    print(out, flush=True)
    t0 = time.perf_counter()
    r_exact = loo_radii(base, 1, "exact")
    out["loo_exact_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    r_hnsw = loo_radii(base, 1, "hnsw")
    out["loo_hnsw_s"] = round(time.perf_counter() - t0, 1)
    out["loo_recall"] = float(np.mean(np.isclose(r_hnsw, r_exact, rtol=1e-4)))
    out["near_copy_threshold_exact"] = float(np.percentile(r_exact, 1.0))
    out["near_copy_threshold_hnsw"] = float(np.percentile(r_hnsw, 1.0))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(out, flush=True)


if __name__ == "__main__":
    main()
