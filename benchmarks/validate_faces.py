"""Issue 17's proof on the faces bundle: does minority guidance make faces with rare attributes?

1. Spearman of the bundle's minority score with the true rarity (-log p of the face's attributes).
2. An attribute reader (a small CNN, one softmax head per attribute) trained on 80 % of the real faces; its
   held-out accuracy per attribute and for the derived flag "carries at least one rare attribute".
3. Same seeds, ``--n`` samples each: the standard sampler vs minority guidance at the rarest class l = L-1
   for each w in ``--scales``: the reader's share of faces with a rare attribute, improved precision / recall
   (k=5) in random-ResNet-50 features against the real faces, and the near-copy rate (issue 18's rule, in
   the minority classifier's features).
Target (issue 17): share >= 3x the standard's with precision within 0.1 of the standard's.

    python benchmarks/validate_faces.py --bundle assets/faces --out docs/results/validate_faces
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from core.bundles.bundle import load_bundle  # noqa: E402
from core.demos.faces import ATTRIBUTES, RARE_VALUES  # noqa: E402
from core.evaluation.metrics import extract_features, make_extractor, precision_recall  # noqa: E402
from core.evaluation.neighbours import find_neighbours  # noqa: E402
from core.maths.guidance import ClassifierGuidance, combine  # noqa: E402
from core.maths.sampling import sample, to_uint8  # noqa: E402

NAMES = list(ATTRIBUTES)
SIZES = [len(ATTRIBUTES[a]) for a in NAMES]
RARE = [np.array([(a, v) in RARE_VALUES for v, _ in ATTRIBUTES[a]]) for a in NAMES]


class Reader(nn.Module):
    """uint8 faces (N, H, W, 3) -> one logit vector per attribute."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(64 * 16, 128), nn.ReLU())
        self.head = nn.Linear(128, sum(SIZES))

    def forward(self, x):
        return torch.split(self.head(self.trunk(x)), SIZES, dim=1)


def to_x(images: np.ndarray, rng=None) -> torch.Tensor:
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    if rng is not None:  # mild blur and noise: generated faces are softer than the rendered ones
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
        blur = torch.from_numpy(rng.random(len(x)) < 0.5)
        xb = torch.nn.functional.conv2d(x, k, padding=1, groups=3)
        x = torch.where(blur[:, None, None, None], xb, x)
        x = x + torch.from_numpy(rng.normal(0, 0.05, x.shape).astype(np.float32))
    return x


def train_reader(images, codes, seed=0, epochs=10):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = Reader()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    y = torch.from_numpy(np.stack([codes[a] for a in NAMES], 1))
    for _ in range(epochs):
        perm = rng.permutation(len(images))
        for s in range(0, len(perm), 128):
            b = perm[s:s + 128]
            out = net(to_x(images[b], rng))
            loss = sum(nn.functional.cross_entropy(o, y[b, j]) for j, o in enumerate(out))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def read(net, images) -> np.ndarray:
    """Predicted codes (N, attributes)."""
    outs = [torch.stack([o.argmax(1) for o in net(to_x(images[s:s + 512]))], 1) for s in range(0, len(images), 512)]
    return torch.cat(outs).numpy()


def has_rare(codes: np.ndarray) -> np.ndarray:
    return np.any([RARE[j][codes[:, j]] for j in range(len(NAMES))], axis=0)


def run_sampler(model, n, steps, guidance, seed, batch=64, sampler="ddim"):
    out = []
    t0 = time.perf_counter()
    for k, s in enumerate(range(0, n, batch)):
        g = torch.Generator().manual_seed((seed * 1_000_003 + k) % (2 ** 63))
        out.append(to_uint8(sample(model, min(batch, n - s), steps=steps, sampler=sampler, guidance=guidance,
                                   generator=g)))
    return np.concatenate(out), (time.perf_counter() - t0) / n


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", default="assets/faces")
    p.add_argument("--data", default=None, help="the faces folder the bundle was built from (metadata.csv); "
                                                "default: the bundle's real.csv columns")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--sampler", default="ddpm", help="ddpm (ancestral; default: DDIM gives this model colour casts, "
                                                     "docs/RESULTS.md) or ddim")
    p.add_argument("--scales", default="1.5,2.5,4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results/validate_faces")
    p.add_argument("--save-npz", default=None, help="also write each set as SET.npz here (for `neighbours`)")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    b = load_bundle(a.bundle)
    real, L = b.real, b.num_classes
    res = {"bundle": a.bundle, "n": a.n, "steps": a.steps, "sampler": a.sampler, "seed": a.seed, "L": L}
    from scipy.stats import spearmanr

    res["score_spearman_vs_rarity"] = float(spearmanr(real.score, real.metadata["rarity"]).statistic)
    print(f"Spearman(minority score, rarity) = {res['score_spearman_vs_rarity']:+.3f}", flush=True)

    codes = {k: real.metadata[k].astype(np.int64) for k in NAMES}
    rng = np.random.default_rng(a.seed)
    perm = rng.permutation(len(real.images))
    cut = int(0.8 * len(perm))
    tr, te = perm[:cut], perm[cut:]
    t0 = time.perf_counter()
    reader = train_reader(real.images[tr], {k: v[tr] for k, v in codes.items()}, a.seed)
    pred = read(reader, real.images[te])
    true = np.stack([codes[k][te] for k in NAMES], 1)
    res["reader"] = {"train_n": len(tr), "heldout_n": len(te), "seconds": time.perf_counter() - t0,
                     "accuracy": {k: float((pred[:, j] == true[:, j]).mean()) for j, k in enumerate(NAMES)}}
    hr_pred, hr_true = has_rare(pred), has_rare(true)
    res["reader"]["rare_flag"] = {"accuracy": float((hr_pred == hr_true).mean()),
                                  "recall": float(hr_pred[hr_true].mean()), "precision": float(hr_true[hr_pred].mean()),
                                  "real_share_true": float(hr_true.mean()), "real_share_read": float(hr_pred.mean())}
    print("reader held-out accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in res["reader"]["accuracy"].items())
          + f"; rare flag {res['reader']['rare_flag']}", flush=True)

    extractor = make_extractor("resnet50-random", seed=a.seed, image_size=64)
    real_f = extract_features(extractor, real.images).pooled
    clf_ex = make_extractor("classifier", classifier=b.classifier)
    real_c = extract_features(clf_ex, real.images).pooled.astype(np.float64)
    from core.evaluation.neighbours import near_copy_threshold

    th = near_copy_threshold(real_c)

    def evaluate(name, images, sec):
        codes_g = read(reader, images)
        prec, rec = precision_recall(real_f, extract_features(extractor, images).pooled)
        nb = find_neighbours(real_c, extract_features(clf_ex, images).pooled.astype(np.float64), 1, th)
        row = {"set": name, "rare_share": float(has_rare(codes_g).mean()), "precision": prec, "recall": rec,
               "near_copy_rate": nb.near_copy_rate, "s_per_image": sec,
               "attribute_shares": {k: {ATTRIBUTES[k][c][0]: float((codes_g[:, j] == c).mean())
                                        for c in range(SIZES[j])} for j, k in enumerate(NAMES)}}
        print(f"{name:22s} rare share {row['rare_share']:.3f}  precision {prec:.3f}  recall {rec:.3f}  "
              f"near-copies {row['near_copy_rate']:.3f}  {sec * 1000:.0f} ms/img", flush=True)
        return row

    sets = {}
    imgs, sec = run_sampler(b.model, a.n, a.steps, None, a.seed, sampler=a.sampler)
    sets["standard"] = (imgs, evaluate("standard", imgs, sec))
    for w in (float(v) for v in a.scales.split(",")):
        g = combine(ClassifierGuidance(b.classifier.net, L - 1, w))
        imgs, sec = run_sampler(b.model, a.n, a.steps, g, a.seed, sampler=a.sampler)
        sets[f"l={L - 1},w={w:g}"] = (imgs, evaluate(f"minority l={L - 1} w={w:g}", imgs, sec))
    if a.save_npz:
        Path(a.save_npz).mkdir(parents=True, exist_ok=True)
        for k, (imgs, _) in sets.items():
            np.savez(Path(a.save_npz) / f"{k.replace('=', '').replace(',', '_')}.npz", images=imgs)
    std = sets["standard"][1]
    res["sets"] = {k: r for k, (_, r) in sets.items()}
    for k, (_, r) in sets.items():
        r["share_ratio"] = r["rare_share"] / max(std["rare_share"], 1e-9)
        r["precision_drop"] = std["precision"] - r["precision"]
        r["meets_target"] = bool(k != "standard" and r["share_ratio"] >= 3 and r["precision_drop"] <= 0.1)
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = ["| set | rare share (reader) | x standard | precision | recall | near-copies | s/image |",
             "|---|---|---|---|---|---|---|"]
    for k, (_, r) in sets.items():
        lines.append(f"| {r['set']} | {r['rare_share']:.3f} | {r['share_ratio']:.2f} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r['near_copy_rate']:.3f} | {r['s_per_image']:.3f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _grid(out / "samples.png", [(k, imgs[:32]) for k, (imgs, _) in sets.items()])


def _grid(path, rows):
    """Each set's first 32 samples as a 4 x 8 block, blocks side by side with their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(3.4 * len(rows), 2.2))
    for ax, (name, imgs) in zip(np.atleast_1d(axes), rows):
        h, w = imgs.shape[1:3]
        imgs = np.concatenate([imgs[:32], np.full((max(0, 32 - len(imgs)), h, w, 3), 255, np.uint8)])
        block = imgs.reshape(4, 8, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(4 * h, 8 * w, 3)
        ax.imshow(block)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
