"""Issue 26.2: what fewer steps cost. Minority guidance at l = L - 1 through each diffusers scheduler at a few step
counts, on a shipped bundle, against the 250-step ancestral reference of the same seeds.

Each row: the rare share (MRI: estimated severity above the real 90th percentile, validate_demo.py's estimator;
faces: the attribute reader of validate_faces.py), improved precision / recall (k = 5) in the random-ResNet-50
space those scripts use (MRI at 128 px, faces at 64 px, every real image as reference) and seconds per image.
The x_T of sample i is the same in every row (validate_demo.py's per-batch generators), so rows differ only by the
sampler. The reference rows are read from the validate script's results (``--reference``, run with
``--steps 250 --sampler ddpm`` and the same --n and --seed), whose metrics are computed by the same functions.

Rows are appended to OUT/rows.json as they finish, and a rerun skips those present (resume).

    python benchmarks/solver_steps.py --bundle assets/mri-atrophy --reference /tmp/run25/mri/validate_demo.json \
        --out docs/results/solver_steps_mri
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
from core.evaluation.metrics import extract_features, make_extractor, precision_recall  # noqa: E402
from core.maths.guidance import ClassifierGuidance, combine  # noqa: E402
from core.maths.sampling import sample  # noqa: E402
from core.maths.solvers import SOLVERS  # noqa: E402
from validate_demo import run_sampler  # noqa: E402  (the same per-batch seeds as the reference rows)


def rare_reader(b, seed: int):
    """(name, images -> bool (N,) 'rare') for the bundle: MRI severity > real p90, or faces' rare attribute."""
    if b.manifest["name"] == "faces":
        from validate_faces import NAMES, has_rare, read, train_reader

        codes = {k: b.real.metadata[k].astype(np.int64) for k in NAMES}
        perm = np.random.default_rng(seed).permutation(len(b.real.images))
        tr = perm[:int(0.8 * len(perm))]  # validate_faces.py's reader: the same split, seed and epochs
        reader = train_reader(b.real.images[tr], {k: v[tr] for k, v in codes.items()}, seed)
        return "faces", lambda images: has_rare(read(reader, images)), 64
    from core.evaluation.severity import SeverityEstimator

    est = SeverityEstimator().fit(b.real.images, b.real.truth)
    thr = float(np.percentile(est(b.real.images), 90))
    return "mri", lambda images: est(images) > thr, 128


def reference_rows(path: str, L: int, scales) -> dict:
    """The 250-step ancestral rows of a validate script's results: {w: {rare_share, precision, recall, s_per_image}}."""
    res = json.loads(Path(path).read_text())
    if res.get("sampler") != "ddpm" or int(res.get("steps", 0)) != 250:
        raise SystemExit(f"error: --reference must be a --sampler ddpm --steps 250 run, got {res.get('sampler')} "
                         f"{res.get('steps')}")
    out = {}
    for w in scales:
        r = res["sets"].get(f"l={L - 1},w={w:g}")
        if r is not None:
            out[w] = {"rare_share": r.get("rare_share", r.get("share_above_p90")), "precision": r["precision"],
                      "recall": r["recall"], "s_per_image": r["s_per_image"]}
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", default="assets/mri-atrophy")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--solvers", default=",".join(SOLVERS))
    p.add_argument("--steps", default="5,10,15,20,30,50")
    p.add_argument("--scales", default="1.5,2.5", help="w values (the app's default is 1.5)")
    p.add_argument("--reference", default=None, help="the validate script's results.json / validate_demo.json of "
                                                     "the 250-step ancestral run")
    p.add_argument("--out", default="docs/results/solver_steps")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    b = load_bundle(a.bundle)
    L = b.num_classes
    kind, is_rare, feature_size = rare_reader(b, a.seed)
    extractor = make_extractor("resnet50-random", seed=a.seed, image_size=feature_size)
    real_f = extract_features(extractor, b.real.images).pooled
    scales = [float(v) for v in a.scales.split(",")]
    rows_path = out / "rows.json"
    rows = json.loads(rows_path.read_text()) if rows_path.exists() else []
    done = {(r["sampler"], r["steps"], r["w"]) for r in rows}
    for name in a.solvers.split(","):  # first-call costs (diffusers' lazy imports, thread pools) kept out of the timings
        sample(b.model, 2, steps=2, sampler=name, guidance=combine(ClassifierGuidance(b.classifier.net, L - 1, 1.0)))
    for w in scales:
        guidance = combine(ClassifierGuidance(b.classifier.net, L - 1, w))
        for steps in (int(s) for s in a.steps.split(",")):
            for name in a.solvers.split(","):
                if (name, steps, w) in done:
                    continue
                images, sec = run_sampler(b.model, a.n, steps, name, guidance, a.seed)
                prec, rec = precision_recall(real_f, extract_features(extractor, images).pooled)
                row = {"sampler": name, "steps": steps, "w": w, "rare_share": float(is_rare(images).mean()),
                       "precision": prec, "recall": rec, "s_per_image": sec, "n": a.n, "seed": a.seed}
                rows.append(row)
                rows_path.write_text(json.dumps(rows, indent=1) + "\n")
                print(f"w={w:g} {name:15s} {steps:3d} steps: rare share {row['rare_share']:.3f} precision {prec:.3f} "
                      f"recall {rec:.3f} {sec * 1000:.0f} ms/img", flush=True)
    ref = reference_rows(a.reference, L, scales) if a.reference else {}
    summary = {"bundle": a.bundle, "kind": kind, "n": a.n, "seed": a.seed, "reference": ref, "rows": rows}
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    _table(out / "table.md", rows, ref)
    _plot(out / "steps.png", rows, ref, kind)


def _table(path, rows, ref):
    lines = ["| w | sampler | steps | rare share | precision | recall | s/image | within (0.02 precision, 0.05 share) |",
             "|---|---|---|---|---|---|---|---|"]
    for w in sorted({r["w"] for r in rows}):
        if w in ref:
            r = ref[w]
            lines.append(f"| {w:g} | reference: ancestral (ddpm) | 250 | {r['rare_share']:.3f} | {r['precision']:.3f} | "
                         f"{r['recall']:.3f} | {r['s_per_image']:.3f} | |")
        for r in sorted((r for r in rows if r["w"] == w), key=lambda r: (r["sampler"], r["steps"])):
            ok = ""
            if w in ref:
                ok = "yes" if (abs(r["precision"] - ref[w]["precision"]) <= 0.02
                               and abs(r["rare_share"] - ref[w]["rare_share"]) <= 0.05) else "no"
            lines.append(f"| {w:g} | {r['sampler']} | {r['steps']} | {r['rare_share']:.3f} | {r['precision']:.3f} | "
                         f"{r['recall']:.3f} | {r['s_per_image']:.3f} | {ok} |")
    Path(path).write_text("\n".join(lines) + "\n")


def _plot(path, rows, ref, kind):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = sorted({r["w"] for r in rows})
    fig, axes = plt.subplots(2, len(scales), figsize=(5.2 * len(scales), 7), squeeze=False)
    for j, w in enumerate(scales):
        for i, (key, label) in enumerate((("rare_share", "rare share"), ("precision", "precision"))):
            ax = axes[i, j]
            for name in sorted({r["sampler"] for r in rows}):
                pts = sorted((r["steps"], r[key]) for r in rows if r["w"] == w and r["sampler"] == name)
                ax.plot(*zip(*pts), marker="o", ms=3, label=name)
            if w in ref:
                ax.axhline(ref[w][key], color="black", ls="--", lw=1, label="ancestral, 250 steps")
                band = 0.05 if key == "rare_share" else 0.02
                ax.axhspan(ref[w][key] - band, ref[w][key] + band, color="grey", alpha=0.15)
            ax.set_xlabel("steps")
            ax.set_ylabel(label)
            ax.set_title(f"{kind}: {label}, l = L-1, w = {w:g}")
            ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
