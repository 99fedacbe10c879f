"""Built-in demo data sets (MRI phantom, cartoon faces), made without any download."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def write_image(out: Path, index: int, image: np.ndarray, folder: str = "images") -> str:
    """Save uint8 (H, W) or (H, W, 3) as OUT/FOLDER/NNNNN.png atomically; returns the relative path."""
    import io

    from PIL import Image

    from core.nets.checkpoint import atomic_write_bytes

    rel = f"{folder}/{index:05d}.png" if folder else f"{index:05d}.png"
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    atomic_write_bytes(out / rel, buf.getvalue())
    return rel


def write_metadata(out: Path, rows: list) -> None:
    """OUT/metadata.csv from a list of dicts (the first row's keys are the columns), atomically."""
    import csv
    import io

    from core.nets.checkpoint import atomic_write_text

    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "metadata.csv", text.getvalue())
