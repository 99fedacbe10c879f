"""Which distance d(x0, x0_hat) makes the minority score (Eq. 7) track the true atrophy severity.

On a seeded subset of a bundle's real slices, each noise draw gives one x0_hat per slice, and from that
same x0_hat several distances are measured: pixel L2, and the LPIPS-style distance in the diffusion
model's own encoder features (``core.maths.score.unet_feature_distance``) for each block and feature timestep
t_f in a grid, and for the mean of the first two blocks (what ``--distance unet-feat`` computes, at
t_f = T/5). Reports Spearman with severity over all slices, the mild (< 0.25) and tail slices, the
split-half retest, and the mean severity of the top 2 %.

``--noise shared`` draws one noise per draw for all slices (common random numbers) instead of the
paper's independent noise per slice: each slice's score is still an unbiased estimate of Eq. 7, but
the errors of the ranking are shared.

Usage: python benchmarks/distance_variants.py [--bundle assets/mri-atrophy] [--n 1500] [--draws 16]
       [--t 600] [--tfs 25,50,100,200,400] [--noise independent|shared] [--out F.json]
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

from core.bundles.bundle import load_bundle  # noqa: E402
from core.maths.score import UNET_FEAT_BLOCKS, sample_noise, unet_feature_distance  # noqa: E402
from score_variants import real_subset, top_mean  # noqa: E402
from validate_demo import spearman  # noqa: E402


def summary(per_draw: np.ndarray, sev: np.ndarray) -> dict:
    """Agreement of the draw-averaged score with severity; per_draw (draws, N) -> dict of floats."""
    score, half = per_draw.mean(0), len(per_draw) // 2
    mild = sev < 0.25
    return {"all": spearman(score, sev), f"all_{half}_draws": spearman(per_draw[:half].mean(0), sev),
            "retest_halves": spearman(per_draw[:half].mean(0), per_draw[half:].mean(0)),
            "mild_lt_0.25": spearman(score[mild], sev[mild]), "tail_ge_0.25": spearman(score[~mild], sev[~mild]),
            "top2pct_mean_severity": top_mean(score, sev)}


@torch.no_grad()
def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", default="assets/mri-atrophy")
    p.add_argument("--n", type=int, default=1500)
    p.add_argument("--draws", type=int, default=16)
    p.add_argument("--t", type=int, default=600)
    p.add_argument("--tfs", default="25,50,100,200,400")
    p.add_argument("--noise", choices=("independent", "shared"), default="independent")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/distance_variants.json")
    a = p.parse_args()
    b = load_bundle(a.bundle)
    model, real = b.model, b.real
    sub, x0, sev = real_subset(real, a.n, a.seed)
    sev = sev.astype(np.float64)
    tfs = [int(v) for v in a.tfs.split(",")]
    # one distance per (t_f, block): the library's function restricted to that block's features
    dists = {}
    for tf in tfs:
        for k in range(1, UNET_FEAT_BLOCKS + 1):
            dists[(tf, k)] = unet_feature_distance(model, blocks=k, t_frac=tf / model.schedule.T)
    shared = torch.randn((a.draws, *x0.shape[1:]), generator=torch.Generator().manual_seed(a.seed + 1234))
    acc: dict = {}
    t0 = time.perf_counter()
    for s in range(0, len(x0), 250):
        xb, ib = x0[s:s + 250], torch.from_numpy(sub[s:s + 250])
        tt = torch.full((len(xb),), a.t, dtype=torch.long)
        noise = (shared[:, None].expand(-1, len(xb), -1, -1, -1) if a.noise == "shared"
                 else sample_noise(ib, a.draws, tuple(xb.shape[1:]), a.seed))
        for d in range(a.draws):
            x_t = model.schedule.q_sample(xb, tt, noise[d])  # Eq. 1
            x0_hat = model.schedule.tweedie_x0(x_t, tt, model(x_t, tt, None), clip=True)  # Eq. 6
            vals = {"l2": (xb - x0_hat).pow(2).flatten(1).mean(1)}
            for tf in tfs:
                one, two = dists[(tf, 1)](xb, x0_hat), dists[(tf, 2)](xb, x0_hat)  # blocks 1 and mean(1, 2)
                vals[f"tf{tf}_block1"], vals[f"tf{tf}_block2"] = one, 2 * two - one
                vals[f"tf{tf}_mean12"] = two
            for k, v in vals.items():
                acc.setdefault(k, np.zeros((a.draws, len(x0))))[d, s:s + len(xb)] = v.numpy()
        print(f"{s + len(xb)}/{len(x0)} slices ({time.perf_counter() - t0:.0f} s)", flush=True)
    res = {"bundle": a.bundle, "n": len(sub), "draws": a.draws, "t": a.t, "noise": a.noise, "tfs": tfs,
           "machine": machine(), "variants": {k: summary(v, sev) for k, v in acc.items()},
           "seconds": time.perf_counter() - t0}
    for k, r in res["variants"].items():
        print(f"{k:14s} " + "  ".join(f"{m} {v:+.3f}" for m, v in r.items()), flush=True)
    write(Path(a.out), res)


if __name__ == "__main__":
    main()
