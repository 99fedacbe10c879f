"""Issue 15.7: what bf16 does to the minority score and to guided samples, measured without a GPU.

Sampling on CUDA runs the backbone under bf16 autocast (core.nets.models.autocast_for, precision "auto"); the score runs in
fp32 everywhere (core.maths.score.SCORE_PRECISION), a choice made from this script's numbers. The score multiplies
the backbone's eps error by sqrt((1 - abar_t) / abar_t) (about 1.1 at t = 0.6 T on the linear schedule, 6.5 on
the cosine schedule's 0.9 T), so rounding in eps could move ranks. Here the same backbone runs on the CPU in fp32
and under bf16 autocast ("bf16"), with the same noise draws:

1. the bundle's score (its distance and t) of a seeded subset of real slices: Spearman(bf16, fp32), the largest
   relative change, and each one's Spearman with the true severity;
2. guided samples (minority guidance at l = L-1, DDIM, same seeds): mean |pixel difference| in grey levels,
   the share of pixels that moved by more than 8 grey levels, and the estimated-severity share above the real
   p90 for both precisions.

Usage: python benchmarks/precision_bf16.py [--bundle assets/mri-atrophy] [--n 1000] [--draws 4] [--samples 64]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import core.maths.score  # noqa: E402
from core.bundles.bundle import load_bundle  # noqa: E402
from core.maths.guidance import ClassifierGuidance, combine  # noqa: E402
from core.maths.sampling import sample, to_uint8  # noqa: E402
from core.maths.score import ScoreSettings, make_distance, minority_score_batch  # noqa: E402
from core.evaluation.severity import SeverityEstimator  # noqa: E402
from score_variants import real_subset  # noqa: E402
from validate_demo import spearman  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", default="assets/mri-atrophy")
    p.add_argument("--n", type=int, default=1000, help="real slices scored")
    p.add_argument("--draws", type=int, default=4)
    p.add_argument("--samples", type=int, default=64, help="guided samples per precision")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--scale", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/precision_bf16.json")
    a = p.parse_args()
    b = load_bundle(a.bundle)
    m = b.manifest["score"]
    settings = ScoreSettings(distance=m["distance"], t=int(m["t"]), draws=a.draws, seed=int(m["seed"]))
    sub, x0, sev = real_subset(b.real, a.n, a.seed)
    idx = torch.as_tensor(sub)
    res = {"bundle": a.bundle, "n": len(sub), "draws": a.draws, "score": settings.to_dict(),
           "device": "cpu", "torch": torch.__version__}
    scores, seconds = {}, {}
    for precision in ("fp32", "bf16"):
        b.model.precision = precision
        core.maths.score.SCORE_PRECISION = precision  # the library scores in fp32 whatever the model's precision
        distance = make_distance(settings.distance, seed=settings.seed, model=b.model)  # fresh x0-feature cache
        t0 = time.perf_counter()
        out = []
        for s in range(0, len(sub), 128):
            out.append(minority_score_batch(b.model, x0[s:s + 128], idx[s:s + 128], settings, distance).numpy())
        scores[precision], seconds[precision] = np.concatenate(out), time.perf_counter() - t0
        print(f"score {precision}: {seconds[precision]:.0f} s, Spearman vs severity "
              f"{spearman(scores[precision], sev):+.4f}", flush=True)
    rel = np.abs(scores["bf16"] - scores["fp32"]) / np.abs(scores["fp32"])
    res["score_seconds"] = seconds
    res["score_spearman_bf16_vs_fp32"] = spearman(scores["bf16"], scores["fp32"])
    res["score_spearman_vs_severity"] = {k: spearman(v, sev) for k, v in scores.items()}
    res["score_rel_change"] = {"median": float(np.median(rel)), "p99": float(np.percentile(rel, 99)), "max": float(rel.max())}
    L = b.num_classes
    th = b.manifest["thresholds"] if "thresholds" in b.manifest else None
    if th is not None:
        th = np.asarray(th)
        cls = {k: np.searchsorted(th[:-1], v, side="left") for k, v in scores.items()}
        res["class_agreement"] = float((cls["bf16"] == cls["fp32"]).mean())
    print(f"score bf16 vs fp32: Spearman {res['score_spearman_bf16_vs_fp32']:.5f}; relative change median "
          f"{res['score_rel_change']['median']:.2e}, p99 {res['score_rel_change']['p99']:.2e}, max "
          f"{res['score_rel_change']['max']:.2e}" + (f"; same class for {res['class_agreement']:.1%}" if th is not None else ""),
          flush=True)

    est = SeverityEstimator().fit(b.real.images, b.real.truth)
    thr = float(np.percentile(est(b.real.images), 90))
    imgs = {}
    for precision in ("fp32", "bf16"):
        b.model.precision = precision
        g = torch.Generator().manual_seed(a.seed)
        t0 = time.perf_counter()
        x = sample(b.model, a.samples, steps=a.steps, sampler="ddim", generator=g,
                   guidance=combine(ClassifierGuidance(b.classifier.net, L - 1, a.scale)))
        imgs[precision] = to_uint8(x)
        seconds[f"sample_{precision}"] = time.perf_counter() - t0
    diff = np.abs(imgs["bf16"].astype(np.int16) - imgs["fp32"].astype(np.int16))
    res["samples"] = {"n": a.samples, "steps": a.steps, "l": L - 1, "w": a.scale,
                      "mean_abs_grey_levels": float(diff.mean()), "share_pixels_moved_gt8": float((diff > 8).mean()),
                      "max_abs_grey_levels": int(diff.max()),
                      "share_above_p90": {k: float((est(v) > thr).mean()) for k, v in imgs.items()},
                      "mean_severity": {k: float(est(v).mean()) for k, v in imgs.items()}}
    print(f"guided samples (l = {L - 1}, w = {a.scale:g}, {a.samples} x {a.steps} DDIM steps): mean |diff| "
          f"{diff.mean():.3f} grey levels, {(diff > 8).mean():.2%} of pixels moved > 8, max {diff.max()}; share above "
          f"real p90 fp32 {res['samples']['share_above_p90']['fp32']:.3f} / bf16 {res['samples']['share_above_p90']['bf16']:.3f}",
          flush=True)
    b.model.precision, core.maths.score.SCORE_PRECISION = "auto", "fp32"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
