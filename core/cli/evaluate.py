"""evaluate: features in one or two spaces, then the report."""
from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import numpy as np
import torch

from core.cli.common import _bar, _positive


# ----------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------
def cmd_evaluate(a) -> int:
    from core.evaluation.evaluate import (PROTOCOLS, EvalSettings, check_sets, evaluate_features, load_image_set, paper_spaces,
                           write_report)
    from core.evaluation.metrics import FEATURES, extract_features, make_extractor

    _positive("batch-size", a.batch_size)
    if a.protocol not in PROTOCOLS:
        raise ValueError(f"unknown --protocol {a.protocol!r}; allowed: {', '.join(PROTOCOLS)}")
    if a.protocol == "paper" and a.features is not None:
        raise ValueError("--protocol paper chooses its own feature spaces; drop --features (or use --protocol single)")
    if a.protocol == "single" and (a.quality_features is not None or a.density_features is not None):
        raise ValueError("--density-features and --quality-features are for --protocol paper")
    for flag, name in (("--features", a.features), ("--quality-features", a.quality_features),
                       ("--density-features", a.density_features)):
        if name is not None and name not in FEATURES:
            raise ValueError(f"unknown {flag} {name!r}; allowed: {', '.join(FEATURES)}")
    if len({Path(g).stem for g in a.generated}) != len(a.generated):
        raise ValueError("--generated: two sets have the same file name; their report rows would collide")
    generated = {}
    for g in a.generated:
        generated[Path(g).stem], _ = load_image_set(g)
    first = next(iter(generated.values()))
    if a.protocol == "paper":
        density_name, quality_name = paper_spaces(first.shape[3], a.quality_features, a.density_features)
    else:
        density_name, quality_name = a.features or "resnet50-random", None
    settings = EvalSettings(features=density_name, quality_features=quality_name, baseline_top=a.baseline_top,
                            seed=a.seed)
    bars = []  # a bar only when a folder is decoded

    def loading(i, n):
        if not bars:
            bars.append(_bar(n, "load real"))
        bars[0].update(i - bars[0].n)

    real, real_info = load_image_set(a.real, size=first.shape[1], channels=first.shape[3], progress=loading)
    for b in bars:
        b.close()
    check_sets(real, generated)
    classifier = None
    if "classifier" in (density_name, quality_name):
        from core.bundles.bundle import resolve
        from core.nets.models import load_classifier

        path = a.classifier or (resolve(a.real, None, None)[1] if real_info["kind"] == "bundle" else None)
        classifier = load_classifier(path, "cpu") if path else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    extractors = [make_extractor(n, device=device, seed=a.seed, classifier=classifier, image_size=a.image_size)
                  for n in ([density_name] + ([quality_name] if quality_name else []))]  # all fail before any work

    def feats(extractor, name, images):
        bar = _bar(images.shape[0], f"features {name} ({extractor.name})")
        out = extract_features(extractor, images, a.batch_size, device, lambda i, n: bar.update(i - bar.n))
        bar.close()
        return out

    spaces = [(feats(ex, "real", real), {name: feats(ex, name, images) for name, images in generated.items()})
              for ex in extractors]
    report = evaluate_features(*spaces[0], settings, progress=lambda s: print(s, file=sys.stderr),
                               quality=spaces[1] if len(spaces) > 1 else None)
    real_info.pop("paths", None)
    extra = {"real": str(a.real), "generated": [str(g) for g in a.generated], "protocol": a.protocol,
             "extractor": extractors[0].info, "real_loaded_as": real_info}
    if len(extractors) > 1:
        extra["quality_extractor"] = extractors[1].info
    out = write_report(report, a.out, extra)
    print(Path(out / "report.md").read_text(encoding="utf-8"), file=sys.stderr)
    print(f"report -> {out}/report.json, report.md, density.png", file=sys.stderr)
    return 0


def cmd_neighbours(a) -> int:
    """neighbours: each generated image's k nearest real images, the near-copy rule, sheets as Figure 24."""
    from core.nets.checkpoint import atomic_write_bytes, atomic_write_json, atomic_write_text
    from core.evaluation.evaluate import check_sets, load_image_set
    from core.evaluation.metrics import extract_features, make_extractor
    from core.evaluation.neighbours import NEAR_COPY_PERCENTILE, find_neighbours, neighbour_sheet

    _positive("k", a.k)
    _positive("rows", a.rows)
    _positive("sheets", a.sheets)
    if not 1 <= a.rows <= 32:
        raise ValueError(f"--rows must be in [1, 32] (a sheet with more rows is unreadable), got {a.rows}")
    if len({Path(g).stem for g in a.generated}) != len(a.generated):
        raise ValueError("--generated: two sets have the same file name; their rows would collide")
    generated = {Path(g).stem: load_image_set(g)[0] for g in a.generated}
    first = next(iter(generated.values()))
    real, real_info = load_image_set(a.real, size=first.shape[1], channels=first.shape[3])
    check_sets(real, generated)
    if a.k > len(real) - 1:
        raise ValueError(f"--k must be at most {len(real) - 1} for {len(real)} real images, got {a.k}")
    features = a.features or ("classifier" if real_info["kind"] == "bundle" else "resnet50-random")
    classifier = None
    if features == "classifier":
        if real_info["kind"] != "bundle":
            raise ValueError("--features classifier needs a bundle as --real (its minority classifier)")
        from core.bundles.bundle import resolve
        from core.nets.models import load_classifier

        classifier = load_classifier(resolve(a.real, None, None)[1], "cpu")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ex = make_extractor(features, device=device, seed=a.seed, classifier=classifier, image_size=a.image_size)

    def feats(name, images):
        bar = _bar(images.shape[0], f"features {name} ({ex.name})")
        out = extract_features(ex, images, 64, device, lambda i, n: bar.update(i - bar.n)).pooled
        bar.close()
        return out

    real_f = feats("real", real)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = io.StringIO()
    w = csv.writer(rows, lineterminator="\n")
    w.writerow(["set", "index", "rank", "real_path", "distance", "near_copy"])
    summary = {"real": str(a.real), "real_n": len(real), "features": ex.info | {"name": ex.name}, "k": a.k,
               "rule": f"near-copy: distance to the nearest real image below the {NEAR_COPY_PERCENTILE:g}st percentile "
                       "of the real images' own leave-one-out nearest-neighbour distances", "sets": {}}
    threshold = None
    sheets = []
    for name, images in generated.items():
        nb = find_neighbours(real_f, feats(name, images), a.k, threshold)
        threshold = nb.threshold  # computed once from the real set
        for i in range(len(images)):
            for r in range(a.k):
                w.writerow([name, i, r + 1, real_info["paths"][nb.indices[i, r]], f"{nb.distances[i, r]:.6g}",
                            int(nb.near_copy[i]) if r == 0 else ""])
        summary["sets"][name] = {"n": len(images), "near_copy_rate": nb.near_copy_rate,
                                 "near_copies": int(nb.near_copy.sum()),
                                 "nearest_distance_median": float(np.median(nb.distances[:, 0])),
                                 "nearest_distance_min": float(nb.distances[:, 0].min())}
        for sheet in range(a.sheets):
            rows_sl = slice(sheet * a.rows, min((sheet + 1) * a.rows, len(images)))
            if rows_sl.start >= len(images):
                break
            sheets.append((name, sheet, neighbour_sheet(images, real, nb, rows_sl,
                                                        f"{name}: nearest real images ({ex.name}); near-copy below "
                                                        f"d = {nb.threshold:.3g}")))
    summary["threshold"] = threshold
    atomic_write_text(out / "neighbours.csv", rows.getvalue())
    for n, (name, sheet, png) in enumerate(sheets):  # the first sheet is neighbours.png, the others are named
        atomic_write_bytes(out / ("neighbours.png" if n == 0 else f"neighbours_{name}_{sheet + 1}.png"), png)
    atomic_write_json(out / "summary.json", summary)
    for name, s in summary["sets"].items():
        print(f"{name}: {s['near_copies']} of {s['n']} near-copies ({s['near_copy_rate']:.1%}); median nearest "
              f"distance {s['nearest_distance_median']:.4g} (near-copy below {threshold:.4g})", file=sys.stderr)
    print(f"neighbours -> {out}/neighbours.csv, {len(sheets)} sheet(s), summary.json", file=sys.stderr)
    return 0
