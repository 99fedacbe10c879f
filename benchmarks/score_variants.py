"""Where the minority score's agreement with ground-truth severity is lost, on a bundle's real data.

For a seeded subset of the bundle's real slices, per-draw L2 reconstruction errors are computed once at
several timesteps (Eq. 7 with the bundle's backbone), and from them:
- Spearman(score, severity) per t with 1, 2, 4, ... draws (how much is draw noise),
- the rank-average of several timesteps (a multi-t variant the paper does not use),
- L2 without clipping x0_hat, and L2 divided by the image's mean squared intensity (brightness),
- the mean true severity of the top 2 % by score, and the z-average of each t with the bundle's own score,
- with ``--antithetic``, the same with noise drawn in pairs (eps, -eps),
- with ``--model RUN``, all of this for another diffusion model (e.g. the same training stopped earlier),
- with ``--phantom DIR`` (the same phantom, rebuilt by ``python -m core data mri-phantom`` with the
  build's seed): Spearman of the score with each nuisance parameter.

Usage: python benchmarks/score_variants.py [--bundle assets/mri-atrophy] [--n 1500] [--draws 8]
       [--ts 300,400,500,600,700,800] [--phantom DIR] [--model RUN] [--save F.npz | --load F.npz]
Writes benchmarks/results/score_variants.json (and, with --save, the per-draw errors, which --load
analyses again without the network).
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write  # noqa: E402

from core.bundles.bundle import load_bundle  # noqa: E402
from core.bundles.data import to_model_range  # noqa: E402
from core.nets.models import load_diffusion  # noqa: E402
from core.maths.score import sample_noise  # noqa: E402
from validate_demo import spearman  # noqa: E402


@torch.no_grad()
def per_draw_errors(model, x0, indices, t, draws, seed, batch=256, antithetic=False):
    """Per-draw L2 (clipped, unclipped) for x0 (N, C, H, W) in [-1, 1]: two arrays (draws, N).
    Eq. 7 as core.maths.score.minority_score_batch computes it, kept per draw (that function returns the mean).
    ``antithetic``: draws come in pairs eps, -eps (adjacent), a variance reduction the paper does not use."""
    clipped, raw = np.empty((draws, len(x0))), np.empty((draws, len(x0)))
    for s in range(0, len(x0), batch):
        xb, ib = x0[s:s + batch], indices[s:s + batch]
        if antithetic:
            half = sample_noise(ib, (draws + 1) // 2, tuple(xb.shape[1:]), seed)
            noise = torch.stack([half, -half], 1).flatten(0, 1)[:draws]
        else:
            noise = sample_noise(ib, draws, tuple(xb.shape[1:]), seed)
        tt = torch.full((len(xb),), t, dtype=torch.long)
        for d, eps in enumerate(noise):
            x_t = model.schedule.q_sample(xb, tt, eps)  # Eq. 1
            out = model(x_t, tt, None)
            for arr, clip in ((clipped, True), (raw, False)):
                x0_hat = model.schedule.tweedie_x0(x_t, tt, out, clip=clip)  # Eq. 6
                arr[d, s:s + batch] = (xb - x0_hat).pow(2).flatten(1).mean(1).numpy()
    return clipped, raw


def real_subset(real, n: int, seed: int):
    """The seeded subset of a bundle's real slices both score benchmarks use: (indices (n,) sorted,
    x0 (n, C, H, W) in [-1, 1], true severity (n,))."""
    sub = np.sort(np.random.default_rng(seed).choice(len(real.images), size=min(n, len(real.images)), replace=False))
    x0 = to_model_range(torch.from_numpy(real.images[sub]).permute(0, 3, 1, 2).contiguous())
    return sub, x0, real.truth[sub]


def zscore(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / x.std()


def top_mean(score: np.ndarray, sev: np.ndarray) -> float:
    """Mean true severity of the 2 % of slices a score ranks highest (what the rarest classes hold)."""
    return float(sev[np.argsort(-score)[:max(1, len(score) // 50)]].mean())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", default="assets/mri-atrophy")
    p.add_argument("--model", default=None, help="score with this run folder's diffusion model instead of the "
                   "bundle's (e.g. an earlier checkpoint of the same training; the real slices stay the bundle's)")
    p.add_argument("--n", type=int, default=1500)
    p.add_argument("--draws", type=int, default=8)
    p.add_argument("--ts", default="300,400,500,600,700,800")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phantom", default=None, help="folder of the rebuilt phantom (metadata.csv) for nuisances")
    p.add_argument("--out", default="benchmarks/results/score_variants.json")
    p.add_argument("--save", default=None, help="also write the per-draw clipped L2 errors (draws, N) per t to this .npz")
    p.add_argument("--antithetic", action="store_true", help="draw noise in pairs eps, -eps")
    p.add_argument("--load", default=None, help="analyse the per-draw errors a --save run wrote instead of recomputing "
                   "them (same --n and --seed; no unclipped variant)")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    b = load_bundle(a.bundle)
    model = load_diffusion(a.model) if a.model else b.model
    real = b.real
    sub, x0, sev = real_subset(real, a.n, a.seed)
    ts = [int(v) for v in a.ts.split(",")]
    res = {"bundle": a.bundle, "model": a.model or a.bundle, "n": len(sub), "draws": a.draws, "antithetic": a.antithetic, "ts": ts, "machine": machine(), "per_t": {}}
    brightness = ((x0 + 1) / 2).pow(2).flatten(1).mean(1).numpy()
    ranks, per_draw = {}, {}
    saved = np.load(a.load) if a.load else None
    if saved is not None and not np.array_equal(saved["indices"], sub):
        sys.exit(f"error: {a.load} holds other slices than --n {a.n} --seed {a.seed}")
    t0 = time.perf_counter()
    for t in ts:
        if saved is not None:
            clipped, raw = saved[f"t{t}"][:a.draws].astype(np.float64), None
        else:
            clipped, raw = per_draw_errors(model, x0, torch.from_numpy(sub), t, a.draws, a.seed,
                                           antithetic=a.antithetic)
        row = {f"draws{k}": spearman(clipped[:k].mean(0), sev) for k in sorted({2 ** i for i in range(a.draws.bit_length())} | {a.draws})}
        per_draw[f"t{t}"] = clipped.astype(np.float32)
        score = clipped.mean(0)
        half = a.draws // 2
        row["retest_halves"] = spearman(clipped[:half].mean(0), clipped[half:].mean(0)) if half else None
        row["unclipped"] = spearman(raw.mean(0), sev) if raw is not None else None
        row["per_brightness"] = spearman(score / brightness, sev)
        row["mild_lt_0.25"] = spearman(score[sev < 0.25], sev[sev < 0.25])
        row["tail_ge_0.25"] = spearman(score[sev >= 0.25], sev[sev >= 0.25])
        row["top2pct_mean_severity"] = top_mean(score, sev)
        # the bundle's own score (its t and draws) z-averaged with this t: a two-timestep variant
        both = zscore(score) + zscore(real.score[sub].astype(np.float64))
        row["zavg_with_bundle_score"] = spearman(both, sev)
        row["zavg_mild_lt_0.25"] = spearman(both[sev < 0.25], sev[sev < 0.25])
        row["zavg_tail_ge_0.25"] = spearman(both[sev >= 0.25], sev[sev >= 0.25])
        row["zavg_top2pct_mean_severity"] = top_mean(both, sev)
        res["per_t"][t] = row
        ranks[t] = np.argsort(np.argsort(score))
        print(f"t={t}: " + ", ".join(f"{k} {v:+.3f}" for k, v in row.items() if v is not None)
              + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    bs = real.score[sub]
    res["bundle_score"] = {"t": b.manifest["score"]["t"], "draws": b.manifest["score"]["draws"], "all": spearman(bs, sev),
                           "top2pct_mean_severity": top_mean(bs, sev)}
    res["brightness_vs_severity"] = spearman(brightness, sev)
    combos = {}
    for lo in range(len(ts)):
        for hi in range(lo + 1, len(ts)):
            key = f"{ts[lo]}-{ts[hi]}"
            combos[key] = spearman(np.mean([ranks[t] for t in ts[lo:hi + 1]], axis=0), sev)
    res["multi_t_rank_average"] = combos
    best = f"best {max(combos, key=combos.get)}: {max(combos.values()):+.3f}" if combos else "n/a (one t)"
    print(f"multi-t rank average, {best}; brightness vs severity {res['brightness_vs_severity']:+.3f}", flush=True)
    if a.phantom:
        with open(Path(a.phantom) / "metadata.csv") as f:
            meta = {r["path"]: r for r in csv.DictReader(f)}
        rows = [meta[real.paths[i]] for i in sub]
        t_n = 600 if 600 in ranks else ts[0]
        score = ranks[t_n]
        nuis = {}
        for col in rows[0]:
            try:
                v = np.array([float(r[col]) for r in rows])
            except ValueError:
                continue
            if col != "severity" and np.std(v) > 0:
                nuis[col] = spearman(score, np.abs(v) if col in ("angle", "shift_x", "shift_y") else v)
        res[f"score_vs_nuisance_t{t_n}"] = nuis
        print(f"score (t={t_n}) vs nuisance: " + ", ".join(f"{k} {v:+.3f}" for k, v in nuis.items()), flush=True)
    res["seconds"] = time.perf_counter() - t0
    write(Path(a.out), res)
    if a.save:
        Path(a.save).parent.mkdir(parents=True, exist_ok=True)
        np.savez(a.save, indices=sub, severity=sev, **per_draw)


if __name__ == "__main__":
    main()
