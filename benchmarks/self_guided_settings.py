"""Issue 15.2: self-guided sampling with the official defaults (x0_hat not clipped inside the guidance, the
interval tested on the respaced index) against the setting used before (clipped, every k-th step from the
first), on the MRI bundle, same seeds, for both samplers and a range of scales.

For each (sampler, setting, w): share of samples above the real p90 of estimated severity, mean estimated
severity, improved precision / recall (k = 5) against all real slices in the random ResNet-50 space at 128 px
(as benchmarks/validate_demo.py), and seconds per image; plus the standard sampler of each sampler.

Usage: python benchmarks/self_guided_settings.py [--n 128] [--scales 0.25,0.5,1,2,4] [--samplers ddpm,ddim]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from core.bundles.bundle import load_bundle  # noqa: E402
from core.maths.guidance import SelfGuidance, combine  # noqa: E402
from core.evaluation.metrics import extract_features, make_extractor, precision_recall  # noqa: E402
from core.maths.score import make_distance  # noqa: E402
from core.evaluation.severity import SeverityEstimator  # noqa: E402
from validate_demo import run_sampler  # noqa: E402

SETTINGS = {"official": dict(clip=False, count_from="last"), "before issue 15": dict(clip=True, count_from="first")}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", default="assets/mri-atrophy")
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--scales", default="0.25,0.5,1,2,4")
    p.add_argument("--samplers", default="ddpm,ddim")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/self_guided_settings.json")
    a = p.parse_args()
    b = load_bundle(a.bundle)
    est = SeverityEstimator().fit(b.real.images, b.real.truth)
    thr = float(np.percentile(est(b.real.images), 90))
    extractor = make_extractor("resnet50-random", seed=a.seed, image_size=128)
    real_f = extract_features(extractor, b.real.images).pooled
    distance = make_distance(b.manifest["score"]["distance"], seed=int(b.manifest["score"]["seed"]), model=b.model)
    rows = []

    def record(sampler, setting, w, guidance):
        imgs, sec = run_sampler(b.model, a.n, a.steps, sampler, guidance, a.seed)
        sev = est(imgs)
        prec, rec = precision_recall(real_f, extract_features(extractor, imgs).pooled)
        row = {"sampler": sampler, "setting": setting, "w": w, "share_above_p90": float((sev > thr).mean()),
               "mean_severity": float(sev.mean()), "precision": prec, "recall": rec, "s_per_image": sec}
        rows.append(row)
        print(f"{sampler:5s} {setting:16s} w={w:<5g} >p90 {row['share_above_p90']:.3f}  severity {row['mean_severity']:.3f}  "
              f"precision {prec:.3f}  recall {rec:.3f}  {sec * 1000:.0f} ms/img", flush=True)

    for sampler in a.samplers.split(","):
        record(sampler, "standard", 0.0, None)
        for setting, kw in SETTINGS.items():
            for w in (float(v) for v in a.scales.split(",")):
                record(sampler, setting, w, combine(SelfGuidance(b.model, w, distance, interval=5, seed=a.seed, **kw)))
    Path(a.out).write_text(json.dumps({"bundle": a.bundle, "n": a.n, "steps": a.steps, "distance":
                                       b.manifest["score"]["distance"], "real_p90": thr, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
