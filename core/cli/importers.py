"""import-adm: OpenAI ADM diffusion checkpoints as run folders (issue 19)."""
from __future__ import annotations

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
