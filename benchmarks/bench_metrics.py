"""Evaluation cost: feature-extraction throughput (images/s) per extractor and input size, and the time of
each metric for N real x N generated features of dimension D (default 10k x 10k x 2048, random normals:
the cost of these metrics depends on N and D, not on the values).

Usage: python benchmarks/bench_metrics.py [--n 10000] [--dim 2048] [--extract-n 256]
                                          [--out benchmarks/results/metrics.json]
The whole-report estimate adds extraction of 2N images at the default extractor's throughput to the
measured metric time.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write  # noqa: E402

from core.evaluation.evaluate import EvalSettings, evaluate_features  # noqa: E402
from core.evaluation.metrics import (Features, avg_knn, extract_features, fid, lof, make_extractor,  # noqa: E402
                          precision_recall, rarity_score)


def clock(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--extract-n", type=int, default=256)
    p.add_argument("--bundle", default="assets/mri-atrophy", help="for classifier features (skipped if absent)")
    p.add_argument("--out", default="benchmarks/results/metrics.json")
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    imgs = np.random.default_rng(0).integers(0, 256, size=(a.extract_n, 32, 32, 1), dtype=np.uint8)
    extract = []
    setups = [("resnet50-random", 224), ("resnet50-random", 128), ("resnet50-random", 64)]
    classifier = None
    if Path(a.bundle, "classifier.json").is_file():
        from core.nets.models import load_classifier

        classifier = load_classifier(a.bundle)
        setups.append(("classifier", None))
    for name, size in setups:
        ex = make_extractor(name, device=device, image_size=size, classifier=classifier)
        extract_features(ex, imgs[:16], 16, device)  # warm-up
        sec = clock(lambda: extract_features(ex, imgs, 64, device))
        extract.append({"features": name, "input_size": size or "native 32", "images": a.extract_n,
                        "images_per_s": round(a.extract_n / sec, 1)})
        print(extract[-1], file=sys.stderr)

    rng = np.random.default_rng(1)
    real = rng.normal(size=(a.n, a.dim)).astype(np.float32)
    gen = (rng.normal(size=(a.n, a.dim)) * 1.1).astype(np.float32)
    metric = {}
    metric["avgknn_s"] = clock(lambda: avg_knn(real, gen, 5))
    metric["lof_s"] = clock(lambda: lof(real, gen, 20))
    metric["rarity_s"] = clock(lambda: rarity_score(real, gen, 5))
    metric["fid_s"] = clock(lambda: fid(real, gen))
    metric["precision_recall_s"] = clock(lambda: precision_recall(real, gen, 5))
    spatial = 7 * 14 * 14  # resnet50 layer3[:7] at 224 px
    rs, gs = rng.normal(size=(a.n, spatial)).astype(np.float32), rng.normal(size=(a.n, spatial)).astype(np.float32)
    metric["whole_report_metrics_s"] = clock(lambda: evaluate_features(
        Features(real, rs), {"gen": Features(gen, gs)}, EvalSettings(baseline_top=1.0)))
    metric = {k: round(v, 2) for k, v in metric.items()}
    print(metric, file=sys.stderr)
    default = extract[0]["images_per_s"]
    est_min = (2 * a.n / default + metric["whole_report_metrics_s"]) / 60
    out = {"machine": machine(), "n": a.n, "dim": a.dim, "extraction": extract, "metrics": metric,
           "whole_report_minutes_estimate": round(est_min, 1),
           "note": "whole report = extraction of 2N images with resnet50-random at 224 px + all metrics at baseline 1.0"}
    write(Path(a.out), out)
    print(f"whole report for {a.n} vs {a.n}: about {est_min:.1f} min", file=sys.stderr)


if __name__ == "__main__":
    main()
