"""explain: each image's rarity map (issue 27) as a PNG overlay and a .npy, a scores table and a sheet."""
from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import numpy as np

from core.cli.common import _accelerator, _bar, _positive, check_output

SHEET_ROWS = 8  # the sheet shows the most unique images, at most this many


def cmd_explain(a) -> int:
    from PIL import Image

    from core.bundles.bundle import check_bundle, load_bundle, load_real
    from core.evaluation.evaluate import load_image_set
    from core.evaluation.explain import explain_images, overlay, score_settings, sheet
    from core.nets.checkpoint import commit_folder

    _positive("batch-size", a.batch_size)
    if a.top is not None:
        _positive("top", a.top)
    check_output(a.out, "--out", "dir")
    if Path(a.out).exists() and any(Path(a.out).iterdir()):
        raise ValueError(f"--out {a.out}: exists and is not empty; choose a new folder")
    manifest = check_bundle(a.bundle)
    acc = _accelerator()
    b = load_bundle(a.bundle, acc.device)
    images, desc = load_image_set(a.data, b.model.image_size, b.model.channels)
    if images.shape[1:] != (b.model.image_size, b.model.image_size, b.model.channels):
        raise ValueError(f"--data images are {images.shape[1:]} but the bundle's model takes "
                         f"{(b.model.image_size, b.model.image_size, b.model.channels)}")
    rows = desc.get("rows", np.arange(len(images)))  # each image's noise row (a folder's slots)
    if desc["kind"] == "bundle":  # a bundle's real images keep their stored rows
        real = load_real(Path(a.data))
        rows = real.row
        if a.top is not None:  # the stored scores choose the most unique, no mapping first
            order = np.argsort(-real.score, kind="stable")[:a.top]
            images, rows = images[order], real.row[order]
    settings = score_settings(manifest)
    print(f"explain: {len(images)} image(s) of {a.data} with {a.bundle}'s score ({settings.distance}, t = {settings.t}, "
          f"{settings.draws} draws)", file=sys.stderr)
    bar = _bar(len(images), "rarity maps")

    def progress(i, total):
        bar.n = i
        bar.refresh()

    ex = explain_images(b.model, images, rows, settings, a.batch_size, progress)
    bar.close()
    order = np.argsort(-ex.score, kind="stable")
    if a.top is not None:
        order = order[:a.top]
    names = [desc["paths"][r] for r in rows]

    def write(tmp: Path):
        (tmp / "maps").mkdir()
        (tmp / "overlays").mkdir()
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["file", "source", "row", "score", "map_mean"])
        for rank, i in enumerate(order):
            stem = f"{rank:05d}"
            np.save(tmp / "maps" / f"{stem}.npy", ex.map[i])
            Image.fromarray(overlay(images[i], ex.map[i])).save(tmp / "overlays" / f"{stem}.png")
            w.writerow([stem, names[i], int(rows[i]), f"{ex.score[i]:.6f}", f"{ex.map[i].mean():.6f}"])
        (tmp / "scores.csv").write_text(buf.getvalue())
        top = order[:SHEET_ROWS]
        sheet(images[top], type(ex)(ex.map[top], ex.score[top], ex.x_t[top], ex.x0_hat[top]),
              [f"{names[i]}: score {ex.score[i]:.4f}" for i in top], tmp / "sheet.png")

    commit_folder(a.out, write)
    print(f"{len(order)} map(s), overlays, scores.csv and sheet.png -> {a.out}", file=sys.stderr)
    return 0
