"""``data faces``: cartoon faces with independent attributes at long-tailed frequencies, in colour.

The CelebA-like demo that needs no download: each face draws every attribute independently from the
frequencies in ``ATTRIBUTES``; ``metadata.csv`` lists the attribute codes, the number of rare attributes
(value frequency <= ``RARE_MAX``) and the ground-truth ``rarity`` = -log p(attributes) (natural log).
Faces are drawn at 4x (at least 128 px) and Lanczos-resized to ``size``; nuisances (face position and
size) vary continuously and do not enter the rarity. Deterministic for a seed.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np

# attribute -> [(value name, frequency)]; codes in metadata.csv are the value's index
ATTRIBUTES: dict[str, list[tuple[str, float]]] = {
    "skin": [("light", 0.5), ("tan", 0.3), ("brown", 0.2)],
    "hair_colour": [("black", 0.4), ("brown", 0.3), ("blond", 0.2), ("red", 0.07), ("blue", 0.03)],
    "hair_style": [("short", 0.6), ("long", 0.32), ("bald", 0.08)],
    "eyeglasses": [("no", 0.94), ("yes", 0.06)],
    "hat": [("no", 0.95), ("yes", 0.05)],
    "beard": [("no", 0.88), ("yes", 0.12)],
    "mouth_open": [("no", 0.8), ("yes", 0.2)],
    "turn": [("front", 0.76), ("left", 0.12), ("right", 0.12)],
    "background": [("grey", 0.5), ("blue", 0.25), ("beige", 0.15), ("green", 0.07), ("magenta", 0.03)],
}
RARE_MAX = 0.06  # an attribute value this rare or rarer is a "rare attribute"
RARE_VALUES = {(a, v) for a, vals in ATTRIBUTES.items() for v, p in vals if p <= RARE_MAX}

SKIN = {"light": (241, 200, 170), "tan": (214, 165, 112), "brown": (160, 108, 70)}
HAIR = {"black": (30, 25, 25), "brown": (105, 65, 35), "blond": (225, 190, 100), "red": (190, 60, 30),
        "blue": (40, 90, 230)}
BACKGROUND = {"grey": (200, 200, 200), "blue": (165, 195, 230), "beige": (230, 215, 180), "green": (140, 195, 140),
              "magenta": (205, 70, 185)}


def draw_attributes(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Independent attribute codes int64 (n,) per attribute, drawn from ATTRIBUTES' frequencies."""
    out = {}
    for name, vals in ATTRIBUTES.items():
        p = np.array([f for _, f in vals], dtype=np.float64)
        out[name] = rng.choice(len(vals), size=n, p=p / p.sum())
    return out


def rarity_of(codes: dict[str, np.ndarray]) -> np.ndarray:
    """Ground-truth rarity float64 (n,): -sum over attributes of log frequency of the drawn value."""
    total = 0.0
    for name, vals in ATTRIBUTES.items():
        logp = np.log(np.array([f for _, f in vals], dtype=np.float64))
        total = total - logp[codes[name]]
    return np.asarray(total, dtype=np.float64)


def rare_count(codes: dict[str, np.ndarray]) -> np.ndarray:
    """How many rare attribute values (frequency <= RARE_MAX) each face carries, int64 (n,)."""
    n = len(next(iter(codes.values())))
    count = np.zeros(n, dtype=np.int64)
    for name, vals in ATTRIBUTES.items():
        rare = np.array([(name, v) in RARE_VALUES for v, _ in vals])
        count += rare[codes[name]]
    return count


def render_face(values: dict[str, str], size: int, jitter: tuple[float, float, float]) -> np.ndarray:
    """One face as uint8 (size, size, 3); ``values`` maps attribute -> value name, ``jitter`` = (dx, dy, scale)."""
    from PIL import Image, ImageDraw

    r = max(128, 4 * size)
    img = Image.new("RGB", (r, r), BACKGROUND[values["background"]])
    d = ImageDraw.Draw(img)
    dx, dy, sc = jitter
    cx, cy = r * (0.5 + dx), r * (0.52 + dy)
    fw, fh = 0.25 * r * sc, 0.31 * r * sc  # face half-width and half-height
    turn = {"front": 0.0, "left": -1.0, "right": 1.0}[values["turn"]]
    shift = turn * 0.09 * r * sc  # features move towards the turn
    skin, hair = SKIN[values["skin"]], HAIR[values["hair_colour"]]
    d.rectangle([cx - 1.3 * fw, cy + 0.85 * fh, cx + 1.3 * fw, r], fill=(70, 70, 80))  # shoulders
    d.rectangle([cx - 0.35 * fw, cy + 0.6 * fh, cx + 0.35 * fw, cy + 1.1 * fh], fill=skin)  # neck
    if values["hair_style"] == "long":
        d.rounded_rectangle([cx - 1.25 * fw, cy - 1.15 * fh, cx + 1.25 * fw, cy + 1.05 * fh], radius=0.6 * fw, fill=hair)
    face_box = [cx - fw + 0.3 * shift, cy - fh, cx + fw + 0.3 * shift, cy + fh]
    d.ellipse(face_box, fill=skin)
    if values["hair_style"] in ("short", "long"):
        d.chord([cx - 1.08 * fw, cy - 1.2 * fh, cx + 1.08 * fw, cy + 0.25 * fh], 180, 360, fill=hair)
    if values["beard"] == "yes":
        d.chord([cx - 0.95 * fw + 0.3 * shift, cy - 0.35 * fh, cx + 0.95 * fw + 0.3 * shift, cy + fh], 0, 180, fill=hair)
    ex, ey, er = 0.4 * fw, cy - 0.12 * fh, 0.13 * fw
    for side in (-1, 1):
        x = cx + side * ex + shift
        d.ellipse([x - er * 1.3, ey - er, x + er * 1.3, ey + er], fill=(250, 250, 250))
        d.ellipse([x - er * 0.6 + 0.3 * er * turn, ey - er * 0.6, x + er * 0.6 + 0.3 * er * turn, ey + er * 0.6],
                  fill=(40, 30, 30))
        if values["eyeglasses"] == "yes":
            g = er * 2.1
            d.rectangle([x - g, ey - 0.8 * g, x + g, ey + 0.8 * g], outline=(15, 15, 15), width=max(2, r // 40))
    if values["eyeglasses"] == "yes":
        d.line([cx - ex + shift + er * 2.1, ey, cx + ex + shift - er * 2.1, ey], fill=(15, 15, 15), width=max(2, r // 40))
    nx = cx + 1.2 * shift
    dark = tuple(int(c * 0.75) for c in skin)
    d.polygon([(nx, ey + 0.1 * fh), (nx - 0.1 * fw, cy + 0.3 * fh), (nx + 0.1 * fw, cy + 0.3 * fh)], fill=dark)
    mx, my = cx + shift, cy + 0.55 * fh
    if values["mouth_open"] == "yes":
        d.ellipse([mx - 0.28 * fw, my - 0.12 * fh, mx + 0.28 * fw, my + 0.14 * fh], fill=(90, 20, 30))
    else:
        d.line([mx - 0.3 * fw, my, mx + 0.3 * fw, my], fill=(150, 40, 50), width=max(2, r // 40))
    if values["hat"] == "yes":
        hat = (190, 30, 40)
        d.rectangle([cx - 1.35 * fw, cy - 0.95 * fh, cx + 1.35 * fw, cy - 0.78 * fh], fill=hat)  # brim
        d.rectangle([cx - 0.85 * fw, cy - 1.55 * fh, cx + 0.85 * fw, cy - 0.9 * fh], fill=hat)  # crown
    small = img.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(small, dtype=np.uint8)


REGION_OFF = {"hat": "no", "eyeglasses": "no", "background": None}  # what a region's mask toggles it to


def region_mask(values: dict[str, str], size: int, jitter: tuple[float, float, float], attribute: str) -> np.ndarray:
    """bool (size, size): where ``attribute`` shows in this face (issue 27): the pixels that change when the hat or
    the glasses are taken off (the same face otherwise), or, for "background", when the background colour changes.
    A pixel counts when its colour moves by more than 24 of 255 in some channel after the resize."""
    if attribute not in REGION_OFF:
        raise ValueError(f"unknown region {attribute!r}; allowed: {', '.join(REGION_OFF)}")
    off = REGION_OFF[attribute] or next(v for v in BACKGROUND if v != values["background"])
    a = render_face(values, size, jitter).astype(np.int16)
    b = render_face({**values, attribute: off}, size, jitter).astype(np.int16)
    return np.abs(a - b).max(2) > 24


def build_faces(out: str | os.PathLike, n: int = 8000, size: int = 32, seed: int = 0,
                progress: Optional[Callable[[int, int], None]] = None) -> Path:
    """Write ``n`` colour PNGs under ``out/images`` and ``out/metadata.csv`` (path, attribute codes,
    rare_attributes, rarity); returns ``out``."""
    from core.demos import write_image, write_metadata
    from core.nets.checkpoint import atomic_write_text

    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if not 8 <= size <= 256:
        raise ValueError(f"--size must be in [8, 256], got {size}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    codes = draw_attributes(rng, n)
    jitter = np.stack([rng.uniform(-0.03, 0.03, n), rng.uniform(-0.03, 0.03, n), rng.uniform(0.92, 1.08, n)], 1)
    rarity, rare = rarity_of(codes), rare_count(codes)
    rows = []
    for i in range(n):
        values = {a: ATTRIBUTES[a][int(codes[a][i])][0] for a in ATTRIBUTES}
        rel = write_image(out, i, render_face(values, size, tuple(jitter[i])))
        rows.append({"path": rel, **{a: int(codes[a][i]) for a in ATTRIBUTES}, "rare_attributes": int(rare[i]),
                     "rarity": round(float(rarity[i]), 5)})
        if progress is not None:
            progress(i + 1, n)
    write_metadata(out, rows)
    legend = "\n".join(f"{a}: " + ", ".join(f"{k}={v} ({p:.0%})" for k, (v, p) in enumerate(vals))
                       for a, vals in ATTRIBUTES.items())
    atomic_write_text(out / "ATTRIBUTES.txt", legend + f"\nrare: value frequency <= {RARE_MAX:.0%}\n"
                      "rarity: -sum of log frequencies of the face's values (natural log)\n")
    return out


def expected_rare_share() -> float:
    """P(a face carries at least one rare attribute value) under ATTRIBUTES' frequencies."""
    p_none = 1.0
    for name, vals in ATTRIBUTES.items():
        p_none *= 1 - sum(p for v, p in vals if (name, v) in RARE_VALUES)
    return 1 - p_none


assert all(math.isclose(sum(p for _, p in v), 1.0) for v in ATTRIBUTES.values())
