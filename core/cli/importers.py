"""import-adm and import-adm-classifier: OpenAI ADM checkpoints as run and classifier folders (issue 19)."""
from __future__ import annotations

import math
import sys


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def print_preset_list(kinds: tuple) -> None:
    """``--preset list``: each preset's line, then the command that imports the same model from flags."""
    from core.nets.adm import PRESETS, describe
    from core.nets.adm_flags import preset_flags

    for p in PRESETS.values():
        if p.kind not in kinds:
            continue
        print(describe(p))
        codebase, flags = preset_flags(p)
        if p.kind == "classifier":
            print(f'    import-adm-classifier --flags "{flags}"')
        else:
            print(f'    import-adm --codebase {codebase} --flags "{flags}"')


def resolve_preset(a, kind: str):
    """(preset, flags record or None, lines saying what the flags describe) from ``--preset NAME`` or ``--flags
    "..."`` (exactly one, with --checkpoint and --out); the flags are parsed, and refused on one line, before any
    file is read. The lines are for after the import, so that any error stays the only line."""
    from core.nets.adm import FLAGS_NAME, count_parameters, preset
    from core.nets.adm_flags import matching_presets, parse_flags

    if (a.preset is None) == (a.flags is None):
        raise ValueError('give --preset NAME (or list) or --flags "<the release\'s flags>", exactly one')
    if a.checkpoint is None or a.out is None:
        what = "RUN" if kind == "diffusion" else "CLF"
        raise ValueError(f"{a.command} needs --checkpoint FILE.pt and --out {what} (or --preset list)")
    if a.preset is not None:
        if getattr(a, "codebase", None) is not None:
            raise ValueError("--codebase applies to --flags only (a preset knows its codebase)")
        return preset(a.preset), None, []
    parsed = parse_flags(a.flags, kind, getattr(a, "codebase", None) or "guided")
    p = parsed.preset
    same = [q.name for q in matching_presets(p)]
    what = (f"the model of preset {same[0]}" + (f" (also {', '.join(same[1:])})" if len(same) > 1 else "")
            if p.name != FLAGS_NAME else "a layout no preset has")
    lines = [f"--flags ({parsed.record()['codebase']} defaults for the rest): {what}, {p.image_size}px, "
             f"{count_parameters(p) / 1e6:.1f}M parameters", *parsed.notes]
    return p, parsed.record(), lines


def cmd_import_adm(a) -> int:
    from core.nets.adm import import_diffusion

    if a.preset == "list":
        print_preset_list(("diffusion", "classifier"))
        return 0
    p, record, lines = resolve_preset(a, "diffusion")
    out = import_diffusion(a.checkpoint, p, a.out, log=_log, record=record)
    for line in lines:
        _log(line)
    _log(f"{p.name} -> {out} (run folder: sample, score, build and the app take it as --model)")
    return 0


def cmd_import_adm_classifier(a) -> int:
    import json

    from core.nets.adm_encoder import import_classifier

    if a.preset == "list":
        print_preset_list(("classifier",))
        return 0
    p, record, lines = resolve_preset(a, "classifier")
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
    out = import_classifier(a.checkpoint, p, a.out, a.minority_head, thresholds, log=_log, record=record)
    for line in lines:
        _log(line)
    _log(f"-> {out} (classifier folder: sample --classifier takes it)")
    return 0
