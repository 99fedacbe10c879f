"""Issue 24.7: the near-copy threshold with duplicate real images, on the shipped bundles.

For each bundle, in the minority classifier's features (the app's space): the 1st-percentile leave-one-out
threshold over all real rows (the old rule) and over the distinct rows (the rule now), on the bundle as shipped
and with 2 % of its real images duplicated (as users' own folders often are); then how many of 200 exact copies
of real images each rule flags. Run: python benchmarks/near_copy_duplicates.py (about a minute on 2 cores).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import write  # noqa: E402
from core.bundles.bundle import load_bundle  # noqa: E402
from core.evaluation.metrics import extract_features, knn_radii, make_extractor  # noqa: E402
from core.evaluation.neighbours import find_neighbours, near_copy_threshold  # noqa: E402


def old_threshold(real: np.ndarray) -> float:
    return float(np.percentile(knn_radii(real, 1), 1.0))


def main() -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for name in ("mri-atrophy", "faces"):
        b = load_bundle(ROOT / "assets" / name)
        ex = make_extractor("classifier", classifier=b.classifier)
        feats = extract_features(ex, b.real.images).pooled.astype(np.float64)
        n = len(feats)
        dup = rng.choice(n, size=n // 50, replace=False)  # 2 % duplicated
        with_dups = np.concatenate([feats, feats[dup]])
        copies = rng.choice(n, size=200, replace=False)
        row = {"n": n, "distinct_as_shipped": int(len(np.unique(feats, axis=0)))}
        for label, real in (("as_shipped", feats), ("with_2pct_duplicates", with_dups)):
            for rule, th in (("old_all_rows", old_threshold(real)), ("new_distinct_rows", near_copy_threshold(real))):
                nb = find_neighbours(real, real[copies], k=1, threshold=th)
                row[f"{label}/{rule}"] = {"threshold": th, "exact_copies_flagged": int(nb.near_copy.sum()), "of": 200}
        out[name] = row
        print(name, row, flush=True)
    write(ROOT / "docs" / "results" / "near_copy_duplicates.json", out)
    return out


if __name__ == "__main__":
    main()
