"""Is it new, and how unusual is it (issue 18): a generated image's nearest real images with the near-copy
rule, and a visitor's own image (PNG, JPEG or a NIfTI slice) scored under the bundle. No gradio import:
handlers take and return plain values; slider changes are plain dicts the UI turns into updates."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from core.errors import InvalidImageError, MinorityError

from .handlers import DISPLAY, Studio, Visit, clip_text, display

NEIGHBOURS_K = 5  # nearest real images shown beside a selected or uploaded image


@dataclass(frozen=True)
class Verdict:
    """One image under a bundle: ``image`` uint8 (H, W, C) as the model sees it; ``score`` its minority score
    over ``draws`` noise draws; ``minority_class`` in [0, L) under the bundle's thresholds; ``percentile`` in
    [0, 100] (share of real scores at or below it); ``coords`` (2,) on the 2-D map; ``neighbours`` the k
    nearest real images (core.evaluation.neighbours.Neighbours, one row)."""

    image: np.ndarray
    score: float
    draws: int
    minority_class: int
    percentile: float
    coords: np.ndarray
    neighbours: object
    why: np.ndarray  # the Figure-1 strip (x0 | x_t | x0_hat | rarity map over x0), uint8 RGB


WHY_TEXT = ("Why is it rare? Left to right: the image, one noised version x_t at the score's timestep, the "
            "model's reconstruction x0_hat from it, and where the two differ (the rarity map over the image; "
            "brighter = more of the score). The map's mean over the pixels is the minority score.")


def strip(images: list, gap: int = 4) -> np.ndarray:
    """uint8 tiles (H, W, C) side by side at the gallery's display size, white gaps: (DISPLAY, ~k W, 3)."""
    tiles = [display(im) for im in images]
    sep = np.full((DISPLAY, gap, 3), 255, np.uint8)
    return np.concatenate([t for tile in tiles for t in (tile, sep)][:-1], axis=1)


def query_strip(query: np.ndarray, neighbours: list) -> np.ndarray:
    """The query image, a wide gap, then its neighbours: (DISPLAY, ~(k + 1) W, 3)."""
    wide = np.full((DISPLAY, 3 * DISPLAY // 8, 3), 255, np.uint8)
    return np.concatenate([display(query), wide, strip(neighbours)], axis=1)


def neighbours_text(studio: Studio, nb, row: int = 0) -> str:
    """Markdown: the k nearest real images' distances, and whether the image is a near-copy."""
    real = studio.bundle.real
    d, idx = nb.distances[row], nb.indices[row]
    ratio = d[0] / nb.threshold if nb.threshold > 0 else float("inf")
    verdict = (f"**Near-copy** of real image `{real.paths[idx[0]]}`: its distance {d[0]:.3g} is below the near-copy "
               f"threshold {nb.threshold:.3g}." if nb.near_copy[row] else
               f"**Not a near-copy**: the nearest real image is {d[0]:.3g} away, {ratio:.1f}x the near-copy threshold "
               f"{nb.threshold:.3g} (the distance 99 % of real images keep from their nearest other real image).")
    rows = " · ".join(f"{d[j]:.3g} (score {real.score[idx[j]]:.4f}, c{int(real.label[idx[j]])})" for j in range(len(d)))
    return f"{verdict}\n\nNearest real images, left to right, in the minority classifier's features: {rows}"


def on_select(studio: Studio, visit: Optional[Visit], grid: str, index) -> tuple:
    """(strip: the selected generated image then its k nearest real images, markdown) for a click on a
    finished grid; ``grid`` is 'guided' or 'standard', ``index`` the image's place in it."""
    if visit is None or not visit.runs:
        raise MinorityError("generate images first, then click one to see its nearest real images")
    run = visit.runs[-1]
    images = run.guided if grid == "guided" else run.standard
    i = int(index)
    if not 0 <= i < len(images):
        raise MinorityError(f"image {i} is not in the last {grid} grid of {len(images)} images")
    nb = studio.neighbours_of(images[i:i + 1], NEIGHBOURS_K)
    real = studio.bundle.real
    ex = studio.explain(images[i:i + 1])
    head = f"**{'Chosen method' if grid == 'guided' else 'Standard sampler'}, image {i + 1}** (left), then its nearest real images. "
    why = f"{WHY_TEXT} Here: score {float(ex.score[0]):.4f} over {ex_draws(studio)} noise draws."
    return (query_strip(images[i], [real.images[j] for j in nb.indices[0]]), head + neighbours_text(studio, nb),
            why_strip(images[i], ex), why)


def ex_draws(studio: Studio) -> int:
    """Noise draws of a clicked image's map: the captions' (handlers.caption_draws), so it sums to its caption."""
    from .handlers import caption_draws

    return caption_draws(studio.bundle.manifest["score"])


def verdict(studio: Studio, image: np.ndarray) -> Verdict:
    """Score, class, percentile, map place and nearest real images of one uint8 image (H, W, C) at the
    bundle's size and channels; the score uses the bundle's own number of noise draws."""
    from core.bundles.bundle import project
    from core.maths.categorize import categorize

    b = studio.bundle
    draws = int(b.manifest["score"]["draws"])
    ex = studio.explain(image[None], draws=draws)  # the score and its map from the same draws
    score = float(ex.score[0])
    label = int(categorize(np.array([score]), np.asarray(b.manifest["thresholds"]))[0])
    pct = float((b.real.score <= score).mean() * 100)
    return Verdict(image, score, draws, label, pct, project(b.real, image[None])[0],
                   studio.neighbours_of(image[None], NEIGHBOURS_K), why_strip(image, ex))


def why_strip(image: np.ndarray, ex) -> np.ndarray:
    """The Figure-1 strip of one image (H, W, C) and its Explained (core.evaluation.explain)."""
    from core.evaluation.explain import figure1_strip

    return figure1_strip(image, ex.x_t[0], ex.x0_hat[0], ex.map[0])


def read_upload(studio: Studio, path: Optional[str], owned: Optional[Callable[[str], bool]] = None):
    """The uploaded file decoded as the bundle's data (core.bundles.data.read_upload), then deleted from
    Gradio's temp folder whatever happened; a MinorityError line for anything refused.

    ``owned(path)``: whether the server received this file through its own upload route (the app passes
    one; see app.ui). A path it refuses (another visitor's download, any other file in Gradio's cache) is
    neither read nor deleted. With ``owned`` given, the file's now empty upload folder is removed too."""
    from core.bundles.data import DEFAULT_BAND, read_upload as decode

    if not path:
        raise MinorityError("choose a PNG, JPEG or NIfTI file first")
    if owned is not None and not owned(str(path)):
        raise MinorityError(f"{clip_text(Path(path).name)}: not a file uploaded to this tab; upload the file "
                            "itself (only files sent with the upload are read)")
    m = studio.bundle.manifest
    band = tuple((m.get("config") or {}).get("slice_band") or DEFAULT_BAND)
    try:
        return decode(path, int(m["image_size"]), int(m.get("channels", 1)), band, name=Path(path).name)
    except InvalidImageError as e:
        raise MinorityError(str(e)) from None
    finally:
        try:
            os.unlink(path)  # the upload is read into memory: nothing of it stays on the server's disk
            if owned is not None:
                os.rmdir(Path(path).parent)  # Gradio's per-upload folder <cache>/<content hash>/, if now empty
        except OSError:
            pass
        release_memory()


def release_memory() -> None:
    """Hand freed memory back to the OS after a decode: a collection, then glibc's malloc_trim (the gzip and
    NIfTI readers leave many freed chunks in the heap, which RSS kept showing). No-op elsewhere."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def slice_control(upload) -> dict:
    """The slice slider for a NIfTI upload (its band's z range, the middle chosen), hidden for images."""
    zs = [z for z, _ in upload.slices]
    if upload.kind != "NIfTI":
        return {"visible": False}
    return {"visible": True, "minimum": zs[0], "maximum": zs[-1], "value": zs[len(zs) // 2], "step": 1,
            "label": f"Axial slice z ({len(zs)} non-empty slices in the bundle's band)"}


def on_upload(studio: Studio, path: Optional[str], owned: Optional[Callable[[str], bool]] = None) -> tuple:
    """(upload state, slice slider dict, results of on_score at the default slice) for a new upload;
    ``owned``: see read_upload."""
    up = read_upload(studio, path, owned)
    ctl = slice_control(up)
    return (up, ctl, *on_score(studio, up, ctl.get("value")))


def on_score(studio: Studio, upload, z=None) -> tuple:
    """(model-view image uint8 (DISPLAY, DISPLAY, 3), markdown, map figure, neighbours strip, Figure-1 strip, its
    caption) for the upload's image or its slice ``z``."""
    from .plots import map_figure

    if upload is None:
        raise MinorityError("upload a PNG, JPEG or NIfTI file first")
    if upload.kind == "NIfTI":
        zs = [zz for zz, _ in upload.slices]
        z = zs[len(zs) // 2] if z is None else int(z)
        if z not in zs:
            raise MinorityError(f"slice z must be one of {zs[0]}..{zs[-1]} (the bundle's band), got {z}")
        arr = dict(upload.slices)[z]
    else:
        arr = upload.slices[0][1]
    image = np.ascontiguousarray(arr.transpose(1, 2, 0))
    v = verdict(studio, image)
    L = studio.bundle.num_classes
    where = f" (slice z = {z})" if upload.kind == "NIfTI" else ""
    text = (f"**{upload.name}**{where}, as the model sees it ({image.shape[0]}x{image.shape[1]}, "
            f"{'grey' if image.shape[2] == 1 else 'RGB'}): minority score **{v.score:.4f}** over {v.draws} noise draws "
            f"(captions use fewer) · class **{v.minority_class}** of 0..{L - 1} · more unique than "
            f"**{v.percentile:.1f} %** of the real images.\n\n" + neighbours_text(studio, v.neighbours))
    real = studio.bundle.real
    fig = map_figure({"real": (real.coords, real.score), "your image": v.coords[None]},
                     title="Real data (2-D map) and your image, placed by its nearest real images")
    nb_strip = strip([real.images[j] for j in v.neighbours.indices[0]])
    return display(image), text, fig, nb_strip, v.why, f"{WHY_TEXT} Here: score {v.score:.4f} over {v.draws} draws."


def on_browse_select(studio: Studio, order, class_filter, page, where, index) -> tuple:
    """(Figure-1 strip, markdown) for a real image clicked on the Browse tab: its map with its own noise row and
    the bundle's draws, so the map averages to the image's stored score."""
    rows, _, _ = studio.browse_rows(order, class_filter, int(page or 1), where=where or "")
    i = int(index)
    if not 0 <= i < len(rows):
        raise MinorityError(f"image {i} is not on this page of {len(rows)} images")
    row = int(rows[i])
    real = studio.bundle.real
    ex = studio.explain(real.images[row:row + 1], draws=int(studio.bundle.manifest["score"]["draws"]), rows=[int(real.row[row])])
    return why_strip(real.images[row], ex), (
        f"Real image `{real.paths[row]}` (class {int(real.label[row])}): stored minority score "
        f"{real.score[row]:.4f}; the map below averages to {float(ex.score[0]):.4f} (the same noise draws). {WHY_TEXT}")
