"""Issue 27: does the rarity map point at what is rare? Measured where the generator knows where that is.

MRI bundle: phantom slices and the tissue the atrophy changed. Faces bundle (``--bundle assets/faces``): fresh faces
drawn with a hat, with glasses, or on the rare magenta background, each beside the very same face without it; the
map's mass in the region (core.demos.faces.region_mask) with the attribute and without it, against the region's area.

Fresh phantom slices (core.demos.phantom.make_sample with masks: the same renderer and nuisance as the bundle's
data, new draws), ``--n`` mild (severity in [0.02, 0.1]) and ``--n`` severe (in [0.5, 1]); each one's rarity map
under the MRI bundle's own score (distance, t, draws). Per slice: the share of the map's mass inside the tissue the
atrophy changed ("changed" mask) against that region's share of the brain's area (the share a map spread evenly
over the brain would give), and the share of the mass outside the brain. Nuisance: Spearman of the stored real
scores with each nuisance parameter among the mild real slices (severity < 0.1; severity itself would dominate).

    python benchmarks/rarity_regions.py --bundle assets/mri-atrophy --n 200 --out docs/results/rarity_regions.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from core.bundles.bundle import load_bundle  # noqa: E402
from core.demos.phantom import Z_BAND, _templates, make_sample, slice_maps  # noqa: E402
from core.evaluation.explain import explain_images, score_settings  # noqa: E402


REGIONS = ("ventricles", "sulci", "cortex", "changed")


def phantom_set(n: int, lo: float, hi: float, seed: int, size: int, maps: dict):
    """n fresh slices with severity ~ U(lo, hi): uint8 (n, H, W, 1), masks {name: bool (n, H, W)}, nuisance rows."""
    rng = np.random.default_rng(seed)
    images, masks, nuisance = [], {k: [] for k in REGIONS + ("brain",)}, []
    for s in rng.uniform(lo, hi, n):
        m = {}
        z = int(rng.integers(Z_BAND[0], Z_BAND[1] + 1))
        img, nu = make_sample(maps[z], float(s), rng, size, masks=m)
        images.append(img[..., None])
        for k in masks:
            masks[k].append(m[k])
        nuisance.append({**nu, "z": z, "severity": float(s)})
    return np.stack(images), {k: np.stack(v) for k, v in masks.items()}, nuisance


def faces(b, n: int, seed: int, settings) -> dict:
    """Per rare attribute: the map's mass share in its region with and without it (same faces otherwise)."""
    from core.demos.faces import ATTRIBUTES, draw_attributes, region_mask, render_face

    rng = np.random.default_rng(seed)
    out = {}
    for k, (attr, on, off) in enumerate((("hat", "yes", "no"), ("eyeglasses", "yes", "no"), ("background", "magenta", "grey"))):
        codes = draw_attributes(rng, n)
        jit = np.stack([rng.uniform(-0.03, 0.03, n), rng.uniform(-0.03, 0.03, n), rng.uniform(0.92, 1.08, n)], 1)
        imgs = {"with": [], "without": []}
        masks = []
        for i in range(n):
            v = {a: ATTRIBUTES[a][int(codes[a][i])][0] for a in ATTRIBUTES}
            v_on, v_off = {**v, attr: on}, {**v, attr: off}
            imgs["with"].append(render_face(v_on, b.model.image_size, tuple(jit[i])))
            imgs["without"].append(render_face(v_off, b.model.image_size, tuple(jit[i])))
            masks.append(region_mask(v_on, b.model.image_size, tuple(jit[i]), attr))
        masks = np.stack(masks).reshape(n, -1)
        row = {"region_area_share_median": float(np.median(masks.mean(1)))}
        for which in ("with", "without"):
            ex = explain_images(b.model, np.stack(imgs[which]), np.arange(n) + 20_000 * (k + 1), settings)
            m = ex.map.astype(np.float64).reshape(n, -1)
            share = (m * masks).sum(1) / m.sum(1)
            row[which] = {"mass_share_median": float(np.median(share)), "mean_score": float(ex.score.mean())}
            row.setdefault("_shares", {})[which] = share
        sh = row.pop("_shares")
        row["with_above_without"] = float((sh["with"] > sh["without"]).mean())
        row["enrichment_with_median"] = float(np.median(sh["with"] / np.maximum(masks.mean(1), 1e-9)))
        out[f"{attr}={on}"] = row
        print(f"{attr}={on}: region {row['region_area_share_median']:.3f} of the image; map mass there "
              f"{row['with']['mass_share_median']:.3f} with it, {row['without']['mass_share_median']:.3f} without "
              f"(same faces; higher with it for {row['with_above_without']:.0%}); enrichment "
              f"{row['enrichment_with_median']:.2f}x; mean score {row['with']['mean_score']:.4f} vs "
              f"{row['without']['mean_score']:.4f}", flush=True)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", default="assets/mri-atrophy")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=27)
    p.add_argument("--out", default="docs/results/rarity_regions.json")
    a = p.parse_args()
    from scipy.stats import spearmanr

    b = load_bundle(a.bundle)
    settings = score_settings(b.manifest)
    if b.manifest["name"] == "faces":
        res = {"bundle": a.bundle, "n_per_set": a.n, "seed": a.seed, "score": b.manifest["score"],
               "faces": faces(b, a.n, a.seed, settings)}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
        return
    tpl = _templates()
    maps = {z: slice_maps(tpl, z) for z in range(Z_BAND[0], Z_BAND[1] + 1)}
    res = {"bundle": a.bundle, "n_per_set": a.n, "seed": a.seed, "score": b.manifest["score"], "sets": {}}
    for k, (name, lo, hi) in enumerate((("mild", 0.02, 0.1), ("severe", 0.5, 1.0))):
        images, masks, nuisance = phantom_set(a.n, lo, hi, a.seed + k, b.model.image_size, maps)
        ex = explain_images(b.model, images, np.arange(a.n) + 10_000 * (k + 1), settings)
        m = ex.map.astype(np.float64).reshape(a.n, -1)
        total, brain = m.sum(1), masks["brain"].reshape(a.n, -1)
        row = {"severity_range": [lo, hi], "mean_score": float(ex.score.mean()), "regions": {}}
        for region in REGIONS:
            mask = masks[region].reshape(a.n, -1)
            mass = (m * mask).sum(1) / total
            area = mask.sum(1) / np.maximum(brain.sum(1), 1)
            keep = area > 0
            enrich = mass[keep] / area[keep]
            row["regions"][region] = {"mass_share_median": float(np.median(mass)), "area_share_of_brain_median":
                                      float(np.median(area)), "enrichment_median": float(np.median(enrich)) if keep.any()
                                      else None, "share_enriched": float((enrich > 1).mean()) if keep.any() else None,
                                      "slices_with_region": int(keep.sum())}
            r = row["regions"][region]
            print(f"{name:6s} {region:10s}: map mass {r['mass_share_median']:.3f} vs area share of the brain "
                  f"{r['area_share_of_brain_median']:.3f} (medians); enrichment {r['enrichment_median'] or 0:.2f}x, "
                  f"> 1 in {r['share_enriched'] or 0:.0%} of {r['slices_with_region']} slices", flush=True)
        row["mass_outside_brain_median"] = float(np.median((m * ~brain).sum(1) / total))
        row["area_outside_brain_median"] = float(np.median((~brain).mean(1)))
        print(f"{name:6s} outside the brain: mass {row['mass_outside_brain_median']:.3f}, area "
              f"{row['area_outside_brain_median']:.3f}; mean score {row['mean_score']:.3f}", flush=True)
        if name == "mild":  # nuisance: within mild slices, where severity varies least
            row["nuisance_spearman"] = {}
            for col in ("angle", "shift_x", "shift_y", "intensity", "bias", "noise", "z", "severity"):
                v = np.array([abs(nu[col]) if col in ("angle", "shift_x", "shift_y") else nu[col] for nu in nuisance])
                row["nuisance_spearman"][col] = float(spearmanr(ex.score, v).statistic)
            print("Spearman(score, nuisance) over the mild slices (|angle|, |shift|): " + ", ".join(
                f"{c} {v:+.2f}" for c, v in row["nuisance_spearman"].items()), flush=True)
        res["sets"][name] = row
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
