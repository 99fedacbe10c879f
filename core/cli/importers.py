"""import-adm and import-adm-classifier: OpenAI ADM checkpoints as run and classifier folders (issue 19)."""
from __future__ import annotations

import math
import sys


def cmd_import_adm(a) -> int:
    from core.nets.adm import PRESETS, describe, import_diffusion, preset

    if a.preset == "list":
        for p in PRESETS.values():
            print(describe(p))
        return 0
    if a.checkpoint is None or a.out is None:
        raise ValueError("import-adm needs --checkpoint FILE.pt and --out RUN (or --preset list)")
    p = preset(a.preset)
    out = import_diffusion(a.checkpoint, p, a.out, log=lambda m: print(m, file=sys.stderr))
    print(f"{p.name} -> {out} (run folder: sample, score, build and the app take it as --model)", file=sys.stderr)
    return 0


def cmd_import_adm_classifier(a) -> int:
    import json

    from core.nets.adm import PRESETS, describe, preset
    from core.nets.adm_encoder import import_classifier

    if a.preset == "list":
        for p in PRESETS.values():
            if p.kind == "classifier":
                print(describe(p))
        return 0
    if a.checkpoint is None or a.out is None:
        raise ValueError("import-adm-classifier needs --checkpoint FILE.pt and --out CLF (or --preset list)")
    thresholds = None
    if a.thresholds is not None:
        try:
            with open(a.thresholds, encoding="utf-8") as f:
                text = f.read()
            data = json.loads(text) if a.thresholds.endswith(".json") else [float(v) for v in text.replace(",", " ").split()]
            thresholds = [float(v) for v in (data["thresholds"] if isinstance(data, dict) else data)]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"--thresholds {a.thresholds}: expected numbers (text) or a JSON list / "
                             f"{{\"thresholds\": [...]}} ({type(e).__name__}: {e})") from None
        if not thresholds or not all(math.isfinite(v) for v in thresholds) or thresholds != sorted(thresholds):
            raise ValueError(f"--thresholds {a.thresholds}: needs finite numbers in increasing order "
                             f"(the score cut points of the classes), got {len(thresholds)} value(s)")
    out = import_classifier(a.checkpoint, preset(a.preset), a.out, a.minority_head, thresholds,
                            log=lambda m: print(m, file=sys.stderr))
    print(f"-> {out} (classifier folder: sample --classifier takes it)", file=sys.stderr)
    return 0
