"""Entry point (also the Hugging Face Space's ``app_file``): ``python app.py [--bundle PATH ...]``.

Opens every bundle under assets/ (the MRI bundle first) by default, or the ``--bundle`` folders given, offline,
on a CPU; a damaged bundle is skipped with its reason, the others open. Honours GRADIO_SERVER_NAME and
GRADIO_SERVER_PORT (as Spaces set them). The first bundle's weights load in a background thread after the
page is served, so the app starts in seconds; ``import app`` loads nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading


def app_device(choice: str = "auto") -> str:
    """--device: auto is cuda on a ZeroGPU Space (``spaces`` importable and CUDA available), else cpu."""
    if choice != "auto":
        return choice
    import importlib.util

    if importlib.util.find_spec("spaces") is None:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv=None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phone-home: Spaces and offline machines alike
    from app.library import ASSETS, POOL_CAPACITY, Library
    from core.errors import MinorityError

    p = argparse.ArgumentParser(prog="python app.py", description="Minority guidance studio (Gradio)")
    p.add_argument("--bundle", action="append", default=None,
                   help=f"bundle folder; repeat for several (default: every bundle under {ASSETS}, MRI first)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the models run; auto: cuda on a ZeroGPU Space (the spaces package is importable and "
                        "CUDA is available), else cpu")
    p.add_argument("--max-loaded", type=int, default=POOL_CAPACITY,
                   help="bundles whose models stay in memory at once (least recently used ones are dropped)")
    a = p.parse_args(argv)
    try:
        lib = Library.open(a.bundle or Library.default_paths(), device=app_device(a.device), capacity=a.max_loaded)
    except (MinorityError, OSError, ValueError) as e:  # no usable bundle: one line, before any server starts
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, why in lib.skipped:
        print(f"warning: bundle {path} skipped: {why}", file=sys.stderr)
    from app.ui import build_ui, launch

    demo = build_ui(lib)
    threading.Thread(target=lib.studios[0].warm, name="warm", daemon=True).start()
    launch(demo)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
