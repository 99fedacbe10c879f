"""The Download button's zip: both grids' PNGs and samples.csv, written atomically, the newest KEEP_EXPORTS kept."""
from __future__ import annotations

import csv
import io
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from app.handlers import Run

KEEP_EXPORTS = 64  # download zips kept in the Studio's temp folder


def export_run(run: "Run", folder: Optional[str | Path] = None) -> Path:
    """A zip of the guided and standard PNGs plus samples.csv (seed, l, w, steps, method, sampler, score)."""
    from PIL import Image

    folder = Path(folder or tempfile.mkdtemp(prefix="minority-"))
    old = sorted(folder.glob("*.zip"), key=lambda f: f.stat().st_mtime)
    for f in old[:-(KEEP_EXPORTS - 1)] if len(old) >= KEEP_EXPORTS else []:
        f.unlink(missing_ok=True)  # a long-lived Space keeps only the newest downloads
    r = run.request
    name = f"{r.method.replace(' ', '-')}_l{r.class_text()}_w{r.scale:g}_seed{r.seed}_{time.time_ns() % 10**9}.zip"
    targets = r.targets().tolist()
    rows = io.StringIO()
    w = csv.writer(rows, lineterminator="\n")
    w.writerow(["file", "grid", "index", "seed", "minority_class", "scale", "steps", "method", "sampler", "gamma",
                "skip", "interval", "score"])
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for grid, images, scores, method, scale in (("guided", run.guided, run.guided_score, r.method, r.scale),
                                                    ("standard", run.standard, run.standard_score, "standard", 0.0)):
            for i, im in enumerate(images):
                png = io.BytesIO()
                Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(png, format="PNG")
                file = f"{grid}/{i:03d}.png"
                z.writestr(file, png.getvalue())
                boost = grid == "guided" and r.method == "Boost-and-Skip"
                l_i = targets[i] if grid == "guided" and r.method == "minority guidance" else r.minority_class
                w.writerow([file, grid, i, r.seed, l_i, scale, r.steps, method, r.sampler,
                            r.gamma if boost else 1.0, r.skip if boost else 0,
                            r.interval if grid == "guided" and r.method == "self-guided" else "", f"{scores[i]:.6f}"])
        z.writestr("samples.csv", rows.getvalue())
    from core.nets.checkpoint import atomic_write_bytes

    atomic_write_bytes(folder / name, buf.getvalue())
    return folder / name
