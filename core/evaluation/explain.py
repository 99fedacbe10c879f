"""Why is it rare? Issue 27: pictures and files of the rarity map (``core.maths.score.rarity_map``) of images.

``explain_images`` maps uint8 images in batches with a bundle's own score settings (its distance, t, draws and
seed; each image's noise from its row index, so a bundle's real images get the very draws of their stored
scores); ``overlay`` lays a map over its image as Figure 1 of the paper reads it (where the model's
reconstruction from noise replaced the image with common features); ``figure1_strip`` puts x0, one noised x_t,
its x0_hat and the overlay side by side; ``sheet`` stacks strips. Images here are uint8 (H, W, C) numpy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from core.bundles.bundle import score_settings  # noqa: F401 - re-exported for the explain command
from core.maths.score import ScoreSettings, make_distance, rarity_map

UPSCALE = 4  # 32-pixel images are drawn 4x (nearest) so a map's positions stay visible


@dataclass
class Explained:
    """Maps of N images: ``map`` float32 (N, H, W) >= 0 whose pixel mean is ``score`` (N,) (Eq. 7), and the
    first draw's x_t and x0_hat as uint8 (N, H, W, C) for display (x_t clipped to [-1, 1] to be drawn)."""

    map: np.ndarray
    score: np.ndarray
    x_t: np.ndarray
    x0_hat: np.ndarray


def _u8(x: torch.Tensor) -> np.ndarray:
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def explain_images(model, images: np.ndarray, indices: np.ndarray, settings: ScoreSettings, batch_size: int = 32,
                   progress: Optional[Callable[[int, int], None]] = None, distance=None) -> Explained:
    """Rarity maps of uint8 images (N, H, W, C) whose noise rows are ``indices`` (N,) int, in batches."""
    from core.maths.eps_model import to_model_range

    if images.ndim != 4 or images.dtype != np.uint8 or len(images) == 0:
        raise ValueError(f"images must be uint8 (N, H, W, C) with N >= 1, got {images.dtype} {images.shape}")
    device = model.device
    distance = distance or make_distance(settings.distance, device, seed=settings.seed, model=model)
    parts = []
    for s in range(0, len(images), batch_size):
        x0 = to_model_range(torch.from_numpy(np.array(images[s:s + batch_size])).permute(0, 3, 1, 2)).to(device)  # a copy: uploads are read-only
        r = rarity_map(model, x0, torch.as_tensor(indices[s:s + batch_size], dtype=torch.long), settings, distance)
        parts.append((r.map.cpu().numpy(), r.score.cpu().numpy(), _u8(r.x_t), _u8(r.x0_hat)))
        if progress is not None:
            progress(min(s + batch_size, len(images)), len(images))
    return Explained(*(np.concatenate([p[k] for p in parts]) for k in range(4)))


def _big(image: np.ndarray, scale: int = UPSCALE) -> np.ndarray:
    """uint8 (H, W, C) -> (H*scale, W*scale, 3), nearest, grey to RGB."""
    rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
    return np.repeat(np.repeat(rgb, scale, 0), scale, 1)


def overlay(image: np.ndarray, rmap: np.ndarray, vmax: Optional[float] = None, scale: int = UPSCALE) -> np.ndarray:
    """The map (H, W) >= 0 over its uint8 image (H, W, C) as uint8 (H*scale, W*scale, 3): the image in grey,
    the map in the 'inferno' colours with opacity growing with the value, 0 .. ``vmax`` (default the map's own
    99th percentile, so one hot pixel does not wash out the rest)."""
    from matplotlib import colormaps

    vmax = float(np.percentile(rmap, 99)) if vmax is None else float(vmax)
    v = np.clip(rmap / max(vmax, 1e-12), 0, 1)
    colour = colormaps["inferno"](v)[..., :3]
    grey = image.astype(np.float64).mean(2, keepdims=True) / 255.0
    alpha = 0.25 + 0.65 * v[..., None]
    out = (1 - alpha) * grey + alpha * colour
    return _big((out * 255).round().astype(np.uint8), scale)


def figure1_strip(x0: np.ndarray, x_t: np.ndarray, x0_hat: np.ndarray, rmap: np.ndarray, gap: int = 4) -> np.ndarray:
    """x0 | x_t | x0_hat | map over x0, each uint8 (H, W, C) (map (H, W)), as one uint8 RGB strip."""
    tiles = [_big(x0), _big(x_t), _big(x0_hat), overlay(x0, rmap)]
    h = tiles[0].shape[0]
    sep = np.full((h, gap, 3), 255, np.uint8)
    return np.concatenate(sum(([t, sep] for t in tiles[:-1]), []) + [tiles[-1]], axis=1)


def sheet(images: np.ndarray, ex: Explained, titles: list, path, columns: str = "x0, x_t, x0_hat, map") -> None:
    """A PNG with one Figure-1 strip per image (rows), each titled (its name and score), written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from core.nets.checkpoint import atomic_write_bytes

    n = len(images)
    fig, axes = plt.subplots(n, 1, figsize=(6.4, 1.75 * n), squeeze=False)
    for i in range(n):
        ax = axes[i, 0]
        ax.imshow(figure1_strip(images[i], ex.x_t[i], ex.x0_hat[i], ex.map[i]))
        ax.set_title(titles[i], fontsize=8, loc="left")
        ax.axis("off")
    fig.suptitle(f"each row: {columns} (the map over x0; its pixel mean is the score)", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
