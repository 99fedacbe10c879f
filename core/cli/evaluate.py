"""evaluate: features in one or two spaces, then the report."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from .common import _bar, _positive


# ----------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------
def cmd_evaluate(a) -> int:
    from ..evaluate import (PROTOCOLS, EvalSettings, check_sets, evaluate_features, load_image_set, paper_spaces,
                           write_report)
    from ..metrics import FEATURES, extract_features, make_extractor

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
        from ..bundle import resolve
        from ..models import load_classifier

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
    extra = {"real": str(a.real), "generated": [str(g) for g in a.generated], "protocol": a.protocol,
             "extractor": extractors[0].info, "real_loaded_as": real_info}
    if len(extractors) > 1:
        extra["quality_extractor"] = extractors[1].info
    out = write_report(report, a.out, extra)
    print(Path(out / "report.md").read_text(encoding="utf-8"), file=sys.stderr)
    print(f"report -> {out}/report.json, report.md, density.png", file=sys.stderr)
    return 0
