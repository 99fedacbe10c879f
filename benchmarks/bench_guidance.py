"""Cost of one guided sampling step over an unguided one, against the classifier's held-out accuracy.

Runs the whole pipeline on a synthetic long-tailed set (discs with a tail of small radii and a 5 %
second blob): trains the built-in UNet, scores the data, categorises it into L classes, trains
classifiers of several widths, then times unguided vs guided sampling side by side (same backbone,
batch and steps, interleaved repeats). Guidance backpropagates through the classifier only.

Usage: python benchmarks/bench_guidance.py [--n 2000] [--diffusion-steps 600] [--clf-steps 400]
Writes benchmarks/results/guidance.json and prints a table. Runs unchanged on CUDA.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, make_long_tailed, timed, write  # noqa: E402

from core.maths.categorize import fit_labels  # noqa: E402
from core.bundles.data import load_image_folder  # noqa: E402
from core.maths.guidance import ClassifierGuidance  # noqa: E402
from core.nets.models import ClassifierConfig, UNetConfig, build_unet, load_diffusion  # noqa: E402
from core.maths.sampling import sample  # noqa: E402
from core.maths.score import ScoreSettings, make_distance, minority_scores  # noqa: E402
from core.nets.train import (ClassifierTrainConfig, DiffusionTrainConfig, param_count, train_classifier,  # noqa: E402
                        train_diffusion)


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--diffusion-steps", type=int, default=600)
    p.add_argument("--clf-steps", type=int, default=400)
    p.add_argument("--widths", default="32,64,64")
    p.add_argument("--clf-widths", default="8,16,32")
    p.add_argument("--batch", type=int, default=16, help="sampling batch for the timing")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--work", default=None, help="keep intermediate files here (default: a temp dir)")
    p.add_argument("--timing-only", default=None, metavar="WIDTHS;WIDTHS",
                   help="skip training: time random-weight backbones of these widths (e.g. '32,64,64;64,128,128') "
                        "against random classifiers of --clf-widths, to show how the ratio depends on the backbone")
    p.add_argument("--bundle", default=None, help="use a bundle's backbone, real images and L-class labels instead "
                                                  "of the synthetic set (e.g. assets/mri-atrophy)")
    p.add_argument("--out", default="benchmarks/results/guidance.json")
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.timing_only:
        return timing_only(a, device)
    work = Path(a.work or tempfile.mkdtemp(prefix="bench_guidance_"))
    if a.bundle:
        from core.bundles.bundle import load_bundle
        from core.bundles.data import ImageSet

        b = load_bundle(a.bundle, device)
        model = b.model
        data = ImageSet(a.bundle, b.real.paths, torch.from_numpy(b.real.images).permute(0, 3, 1, 2).contiguous())
        labels, th = b.real.label, np.array(b.manifest["thresholds"])
        a.classes, a.n, a.widths, a.diffusion_steps = b.num_classes, len(data), "bundle", b.manifest["training"]["diffusion_steps"]
        rho = spearman(b.real.score, b.real.truth)
        print(f"bundle {a.bundle}: minority score vs severity Spearman {rho:.3f}", flush=True)
    else:
        truth = make_long_tailed(work / "data", a.n)
        data = load_image_folder(work / "data", 32, 1)
        unet = UNetConfig(32, 1, tuple(int(w) for w in a.widths.split(",")))
        run = work / "run"
        if not (run / "model.json").is_file():
            print(f"training the backbone ({param_count(build_unet(unet)) / 1e6:.2f}M params, {a.diffusion_steps} steps)", flush=True)
            train_diffusion(data, run, DiffusionTrainConfig(steps=a.diffusion_steps, batch_size=32, unet=unet))
        model = load_diffusion(run, device)
        settings = ScoreSettings(distance="l2", t=model.schedule.default_score_t(), draws=2, seed=0)
        scores = minority_scores(model, data.images, torch.arange(len(data)), settings, make_distance("l2"), batch_size=128)
        th, labels = fit_labels(scores, a.classes)
        rho = spearman(scores, truth[[int(Path(q).stem) for q in data.paths]])
        print(f"minority score (l2) vs synthetic rarity: Spearman {rho:.3f}", flush=True)

    x_batch = a.batch
    rows = []
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    base_t = timed(lambda: sample(model, x_batch, steps=a.sample_steps, generator=g()), a.repeats)
    for base in [int(w) for w in a.clf_widths.split(",")]:
        cfg = ClassifierTrainConfig(steps=a.clf_steps, batch_size=64, eval_every=a.clf_steps,
                                    net=ClassifierConfig(32, 1, a.classes, base_channels=base))
        out = work / f"clf{base}"
        res = train_classifier(data, labels, model.schedule, out, cfg, th.tolist(), {})
        from core.nets.models import load_classifier

        clf = load_classifier(out, device)
        guidance = ClassifierGuidance(clf.net, a.classes - 1, 2.0)
        # interleave: unguided, guided, unguided, ... so drift in machine load hits both alike
        un, gu = [], []
        for _ in range(a.repeats):
            un.append(timed(lambda: sample(model, x_batch, steps=a.sample_steps, generator=g()), 1))
            gu.append(timed(lambda: sample(model, x_batch, steps=a.sample_steps, guidance=guidance, generator=g()), 1))
        t_un, t_gu = float(np.median(un)), float(np.median(gu))
        m = res["metrics"]
        row = {"clf_base_channels": base, "clf_params": param_count(clf.net), "val_acc": m.get("val_acc"),
               "val_mae": m.get("val_mae"), "chance_acc": 1 / a.classes,
               "unguided_ms_per_step": 1000 * t_un / a.sample_steps, "guided_ms_per_step": 1000 * t_gu / a.sample_steps,
               "ratio": t_gu / t_un}
        rows.append(row)
        print(f"classifier base {base:3d} ({row['clf_params'] / 1e6:.3f}M): held-out acc {row['val_acc']:.3f} "
              f"(chance {1 / a.classes:.2f}), |class err| {row['val_mae']:.2f}; step {row['unguided_ms_per_step']:.1f} ms "
              f"-> {row['guided_ms_per_step']:.1f} ms guided = {row['ratio']:.3f}x", flush=True)
    write(Path(a.out), {"machine": machine(), "backbone_params": param_count(model.net), "backbone_widths": a.widths,
                        "n_images": a.n, "classes": a.classes, "diffusion_steps": a.diffusion_steps,
                        "clf_steps": a.clf_steps, "sampling_batch": x_batch, "sample_steps": a.sample_steps,
                        "score_spearman_vs_truth": rho, "first_unguided_s": base_t, "rows": rows})


def timing_only(a, device):
    from core.nets.models import DiffusionModel, NoiseConditionedClassifier
    from core.maths.schedule import make_schedule

    rows = []
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    for widths in a.timing_only.split(";"):
        torch.manual_seed(0)
        w = tuple(int(v) for v in widths.split(","))
        model = DiffusionModel(build_unet(UNetConfig(32, 1, w)), make_schedule("linear"), 32, 1).to(device).eval()
        model.requires_grad_(False)
        for base in [int(v) for v in a.clf_widths.split(",")]:
            clf = NoiseConditionedClassifier(ClassifierConfig(32, 1, a.classes, base_channels=base)).to(device).eval()
            guidance = ClassifierGuidance(clf.requires_grad_(False), a.classes - 1, 2.0)
            un, gu = [], []
            for _ in range(a.repeats):
                un.append(timed(lambda: sample(model, a.batch, steps=a.sample_steps, generator=g()), 1))
                gu.append(timed(lambda: sample(model, a.batch, steps=a.sample_steps, guidance=guidance, generator=g()), 1))
            row = {"backbone_widths": widths, "backbone_params": param_count(model.net), "clf_base_channels": base,
                   "clf_params": param_count(clf), "unguided_ms_per_step": 1000 * float(np.median(un)) / a.sample_steps,
                   "guided_ms_per_step": 1000 * float(np.median(gu)) / a.sample_steps}
            row["ratio"] = row["guided_ms_per_step"] / row["unguided_ms_per_step"]
            rows.append(row)
            print(f"backbone {widths} ({row['backbone_params'] / 1e6:.2f}M) + classifier base {base} "
                  f"({row['clf_params'] / 1e6:.3f}M): {row['unguided_ms_per_step']:.1f} -> {row['guided_ms_per_step']:.1f} "
                  f"ms/step = {row['ratio']:.3f}x", flush=True)
    write(Path(a.out), {"machine": machine(), "mode": "timing-only (random weights)", "sampling_batch": a.batch,
                        "sample_steps": a.sample_steps, "rows": rows})


if __name__ == "__main__":
    main()
