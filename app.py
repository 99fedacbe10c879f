"""Entry point (also the Hugging Face Space's ``app_file``): ``python app.py [--bundle PATH]``.

Opens the shipped MRI bundle by default, offline, on a CPU. Honours GRADIO_SERVER_NAME and
GRADIO_SERVER_PORT (as Spaces set them). Weights load in a background thread after the page is served,
so the app starts in seconds; ``import app`` loads nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading

def main(argv=None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phone-home: Spaces and offline machines alike
    from app.handlers import DEFAULT_BUNDLE, Studio
    from core.errors import MinorityError

    p = argparse.ArgumentParser(prog="python app.py", description="Minority guidance studio (Gradio)")
    p.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="bundle folder (default: assets/mri-atrophy)")
    a = p.parse_args(argv)
    studio = Studio(a.bundle)
    try:
        studio.manifest()  # a missing or damaged bundle: one line, before any server starts
    except (MinorityError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from app.ui import build_ui, launch

    demo = build_ui(studio)
    threading.Thread(target=studio.warm, name="warm", daemon=True).start()
    launch(demo)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
