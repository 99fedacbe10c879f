"""evaluate: features in one or two spaces, then the report."""
from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import numpy as np
import torch

from core.cli.common import _bar, _positive, report_skipped


# ----------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------
def cmd_evaluate(a) -> int:
    from core.evaluation.evaluate import (PROTOCOLS, EvalSettings, check_sets, evaluate_features, is_streamed,
                                          load_image_set, paper_spaces, write_report)
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
    classifier = None
    if "classifier" in (density_name, quality_name):
        from core.bundles.bundle import resolve
        from core.nets.models import load_classifier

        bundle_real = not is_streamed(a.real) and Path(a.real).is_dir()
        path = a.classifier or (resolve(a.real, None, None)[1] if bundle_real else None)
        classifier = load_classifier(path, "cpu") if path else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    extractors = [make_extractor(n, device=device, seed=a.seed, classifier=classifier, image_size=a.image_size)
                  for n in ([density_name] + ([quality_name] if quality_name else []))]  # all fail before any work

    def feats(extractor, name, images):
        bar = _bar(images.shape[0], f"features {name} ({extractor.name})")
        out = extract_features(extractor, images, a.batch_size, device, lambda i, n: bar.update(i - bar.n))
        bar.close()
        return out

    if is_streamed(a.real):  # decoded chunk by chunk, only the features kept (issue 28)
        real_feats, real_info = _stream_real(a, _open_real(a, first), extractors, device)
        check_sets(np.zeros((1,) + first.shape[1:], np.uint8), generated)
    else:
        real, real_info = load_image_set(a.real, size=first.shape[1], channels=first.shape[3])
        check_sets(real, generated)
        real_feats = [feats(ex, "real", real) for ex in extractors]
    spaces = [(rf, {name: feats(ex, name, images) for name, images in generated.items()})
              for rf, ex in zip(real_feats, extractors)]
    report = evaluate_features(*spaces[0], settings, progress=lambda s: print(s, file=sys.stderr),
                               quality=spaces[1] if len(spaces) > 1 else None)
    for key in ("paths", "source", "slots"):  # the report keeps what the real set was, not its rows
        real_info.pop(key, None)
    extra = {"real": str(a.real), "generated": [str(g) for g in a.generated], "protocol": a.protocol,
             "extractor": extractors[0].info, "real_loaded_as": real_info}
    if len(extractors) > 1:
        extra["quality_extractor"] = extractors[1].info
    out = write_report(report, a.out, extra)
    print(Path(out / "report.md").read_text(encoding="utf-8"), file=sys.stderr)
    print(f"report -> {out}/report.json, report.md, density.png", file=sys.stderr)
    return 0


def _open_real(a, first):
    """The --real data as a listed stream (core.bundles.stream) at the generated images' size and channels."""
    from core.bundles.stream import open_source
    from core.cli.common import _band

    _positive("workers", a.workers, 0)
    _positive("chunk", a.chunk)
    return open_source(a.real, first.shape[1], first.shape[3], _band(a.slice_band), a.image_column, a.label_column,
                       chunk=a.chunk)


def _stream_real(a, source, extractors, device) -> tuple:
    """The --real data streamed: (Features per extractor, info with each image's name, the source, the slots)."""
    from core.evaluation.evaluate import stream_features

    bar = _bar(source.slots, f"features real ({', '.join(ex.name for ex in extractors)})")
    feats, names, slots, skipped = stream_features(extractors, source, a.batch_size, device, a.workers,
                                                   progress=bar.update)
    bar.close()
    report_skipped(skipped, source.slots, "real image")
    return feats, {"kind": source.kind, "skipped": len(skipped), "paths": names, "source": source, "slots": slots}


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
    from core.evaluation.ann import INDEXES
    from core.evaluation.evaluate import StreamedImages, is_streamed

    if a.index not in INDEXES:
        raise ValueError(f"unknown --index {a.index!r}; allowed: {', '.join(INDEXES)}")
    generated = {Path(g).stem: load_image_set(g)[0] for g in a.generated}
    first = next(iter(generated.values()))
    streamed = is_streamed(a.real)
    real = real_info = None
    if not streamed:
        real, real_info = load_image_set(a.real, size=first.shape[1], channels=first.shape[3])
        check_sets(real, generated)
        n_real = len(real)
    else:
        check_sets(np.zeros((1,) + first.shape[1:], np.uint8), generated)
        source = _open_real(a, first)  # listed only: the count is known before any image is decoded
        n_real = source.slots
    if a.k > n_real - 1:
        raise ValueError(f"--k must be at most {n_real - 1} for {n_real} real images, got {a.k}")
    features = a.features or ("classifier" if not streamed and real_info["kind"] == "bundle" else "resnet50-random")
    classifier = None
    if features == "classifier":
        if streamed or real_info["kind"] != "bundle":
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

    if streamed:  # decoded chunk by chunk, only the features kept; the sheets fetch their few real images back
        a.batch_size = 64
        (real_f,), real_info = _stream_real(a, source, [ex], device)
        real_f = real_f.pooled
        real = StreamedImages(real_info["source"], real_info["slots"])
    else:
        real_f = feats("real", real)
    if a.k > len(real_f) - 1:
        raise ValueError(f"--k must be at most {len(real_f) - 1} for {len(real_f)} real images, got {a.k}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = io.StringIO()
    w = csv.writer(rows, lineterminator="\n")
    w.writerow(["set", "index", "rank", "real_path", "distance", "near_copy"])
    summary = {"real": str(a.real), "real_n": len(real_f), "features": ex.info | {"name": ex.name}, "k": a.k,
               "index": a.index,
               "rule": f"near-copy: distance to the nearest real image below the {NEAR_COPY_PERCENTILE:g}st percentile "
                       "of the real images' own leave-one-out nearest-neighbour distances", "sets": {}}
    threshold = None
    sheets = []
    for name, images in generated.items():
        nb = find_neighbours(real_f, feats(name, images), a.k, threshold, index=a.index)
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
