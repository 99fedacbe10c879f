"""A small sweep of the minority classifier on a bundle's real data and labels.

Each variant (width, learning rate, steps) is trained like build-demo trains it, then measured two ways:
held-out metrics (``core.nets.train.evaluate_classifier``: accuracy over all t and at t < T/4, mean class error,
Spearman of the expected class with the class), and what guidance with it does: ``--n`` DDIM samples at
the rarest class and ``--scale``, their share above the real 90th severity percentile (``core.evaluation.severity``)
and precision against real slices in random ResNet-50 features (as validate_demo). The bundle's own
classifier is the first row.

Usage: python benchmarks/sweep_classifier.py [--bundle assets/mri-atrophy] [--variants 16:3e-4:3000,32:3e-4:3000]
Writes benchmarks/results/sweep_classifier.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write  # noqa: E402
from validate_demo import run_sampler  # noqa: E402

from core.bundles.bundle import load_bundle  # noqa: E402
from core.bundles.data import ImageSet  # noqa: E402
from core.maths.guidance import ClassifierGuidance, combine  # noqa: E402
from core.evaluation.metrics import extract_features, make_extractor, precision_recall  # noqa: E402
from core.nets.models import ClassifierConfig, load_classifier  # noqa: E402
from core.evaluation.severity import SeverityEstimator  # noqa: E402
from core.nets.train import ClassifierTrainConfig, evaluate_classifier, split_holdout, train_classifier  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", default="assets/mri-atrophy")
    p.add_argument("--variants", default="16:1e-3:3000,32:3e-4:3000,16:3e-4:6000",
                   help="BASE_CHANNELS:LR:STEPS, comma separated")
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--steps", type=int, default=30, help="DDIM steps of the guidance check")
    p.add_argument("--scale", type=float, default=2.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real-n", type=int, default=3000, help="real images in the precision reference set")
    p.add_argument("--out", default="benchmarks/results/sweep_classifier.json")
    a = p.parse_args()
    b = load_bundle(a.bundle)
    real, L = b.real, b.num_classes
    images = torch.from_numpy(real.images).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(real.label).long()
    train_info = b.classifier.info.get("train", {})
    holdout, seed = float(train_info.get("holdout", 0.1)), int(train_info.get("seed", 0))
    _, val = split_holdout(len(images), holdout, seed)
    est = SeverityEstimator().fit(real.images, real.truth)
    thr = float(np.percentile(est(real.images), 90))
    extractor = make_extractor("resnet50-random", seed=a.seed, image_size=128)
    rng = np.random.default_rng(a.seed)
    real_f = extract_features(extractor, real.images[rng.choice(len(real.images), min(a.real_n, len(real.images)), replace=False)]).pooled

    def measure(name, clf_net, seconds):
        m = evaluate_classifier(clf_net.eval(), b.model.schedule, images[val], labels[val], None, seed)
        imgs, _ = run_sampler(b.model, a.n, a.steps, "ddim", combine(ClassifierGuidance(clf_net, L - 1, a.scale)), a.seed)
        prec, _ = precision_recall(real_f, extract_features(extractor, imgs).pooled)
        row = {"variant": name, **m, "share_above_p90": float((est(imgs) > thr).mean()), "precision": prec,
               "train_seconds": seconds}
        print(f"{name:18s} acc {m['val_acc']:.3f}  t<T/4 acc {m.get('val_acc_low_t', float('nan')):.3f} "
              f"|err| {m.get('val_mae_low_t', float('nan')):.2f}  rank {m['val_rank_corr']:+.3f}  "
              f"guided >p90 {row['share_above_p90']:.3f} precision {prec:.3f}"
              + (f"  ({seconds:.0f} s)" if seconds is not None else ""), flush=True)
        return row

    rows = [measure(f"bundle ({b.manifest['training']['classifier_base_channels']}:3e-4:"
                    f"{b.manifest['training']['classifier_steps']})", b.classifier.net, None)]
    data = ImageSet(root=a.bundle, paths=list(real.paths), images=images)
    for spec in a.variants.split(","):
        base, lr, steps = spec.split(":")
        cfg = ClassifierTrainConfig(steps=int(steps), batch_size=64, lr=float(lr), seed=seed, holdout=holdout,
                                    eval_every=int(steps),
                                    net=ClassifierConfig(b.manifest["image_size"], 1, L, base_channels=int(base)))
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            train_classifier(data, real.label, b.model.schedule, tmp, cfg, b.manifest["thresholds"], {})
            clf = load_classifier(tmp)
            rows.append(measure(spec, clf.net, time.perf_counter() - t0))
    write(Path(a.out), {"machine": machine(), "bundle": a.bundle, "n": a.n, "steps": a.steps, "scale": a.scale,
                        "real_p90_estimated": thr, "rows": rows})


if __name__ == "__main__":
    main()
