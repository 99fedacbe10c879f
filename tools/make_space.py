"""Write a Hugging Face Space folder for the studio: ``python tools/make_space.py OUT [--hardware cpu-basic|zero-a10g]``.

The Space gets the app and the library (app.py, app/, core/), the shipped bundles (assets/), a README.md whose
front matter Spaces reads (sdk gradio at the version requirements-space.txt pins, app_file app.py) and, as its
requirements.txt, the run-time list requirements-space.txt: no test tools. Push OUT to the Space's git
repository (README: "Deploy as a Hugging Face Space"). Nothing is downloaded or uploaded here.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HARDWARE = ("cpu-basic", "zero-a10g")
CARRIED = ("app.py", "app", "core", "assets")


def gradio_pin(requirements: str) -> str:
    m = re.search(r"^gradio==([0-9][0-9.]*)\s*$", requirements, re.M)
    if m is None:
        raise SystemExit("error: requirements-space.txt must pin gradio==X.Y.Z (the Space's sdk_version)")
    return m.group(1)


def front_matter(version: str, hardware: str) -> str:
    return "\n".join([
        "---", "title: Minority guidance studio", "emoji: 🧭", "colorFrom: indigo", "colorTo: gray", "sdk: gradio",
        f"sdk_version: {version}", 'python_version: "3.11"', "app_file: app.py", f"suggested_hardware: {hardware}",
        "pinned: false", "---", ""])


def make_space(out: Path, hardware: str = "cpu-basic") -> Path:
    if hardware not in HARDWARE:
        raise SystemExit(f"error: --hardware must be one of {', '.join(HARDWARE)}, got {hardware!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} exists and is not empty")
    reqs = (ROOT / "requirements-space.txt").read_text()
    out.mkdir(parents=True, exist_ok=True)
    for name in CARRIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, out / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.work"))
        else:
            shutil.copy2(src, out / name)
    (out / "requirements.txt").write_text(reqs)
    gpu = ("On ZeroGPU the generate and score-an-image handlers carry `@spaces.GPU` (app/ui.py `gpu`) and the "
           "models run on CUDA (app.py --device auto).") if hardware == "zero-a10g" else \
        "On CPU basic (2 vCPU) the app runs as it does on a laptop."
    (out / "README.md").write_text(front_matter(gradio_pin(reqs), hardware) + (
        "# Minority guidance studio\n\nGenerate the rare: minority guidance (Um, Lee & Ye, ICLR 2024) on a brain-MRI "
        "atrophy phantom and on cartoon faces. Move the target class l and the scale w and watch the guided grid "
        f"beside the standard one.\n\n{gpu}\n"))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--hardware", default="cpu-basic", help=f"one of {', '.join(HARDWARE)}")
    a = p.parse_args(argv)
    print(make_space(Path(a.out), a.hardware), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
