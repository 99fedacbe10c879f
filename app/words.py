"""What the page says and shows about a run, without gradio or torch: gallery thumbnails and captions, the words
for a class l, one phrase per method's settings, the bundle's starting sampler and steps (split from handlers.py in
session 12; ``app.handlers`` re-exports every name)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from .request import DEFAULTS, LIMITS, SAMPLERS, GenerateRequest

DISPLAY = 64  # gallery thumbnails are upscaled to this side (the browser scales them further)


def display(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, C) -> (DISPLAY, DISPLAY, 3) for the gallery (bicubic upscale, grey to RGB)."""
    from PIL import Image

    img = image[..., 0] if image.shape[-1] == 1 else image
    out = np.asarray(Image.fromarray(img).resize((DISPLAY, DISPLAY), Image.Resampling.BICUBIC))
    return np.repeat(out[..., None], 3, axis=2) if out.ndim == 2 else out


def captions(images: np.ndarray, scores: Optional[np.ndarray], severity: Optional[np.ndarray] = None) -> list:
    """Gallery items [(image, caption)]; caption = minority score when known, then the estimated atrophy
    when the bundle has ground truth to fit the estimator on ("0.036 · 0.71": short enough for a 4x4 grid)."""
    def caption(i):
        if scores is None:
            return ""
        return f"{scores[i]:.3f}" + (f" · {severity[i]:.2f}" if severity is not None else "")
    return [(display(im), caption(i)) for i, im in enumerate(images)]


def class_choices(num_classes: int) -> list:
    """Slider-free class labels for the browse filter: 'all', then 0 .. L-1."""
    return ["all"] + [str(i) for i in range(num_classes)]


def rarity_label(minority_class: int, num_classes: int) -> str:
    """Words for l: 0 = most common, L-1 = rarest."""
    q = minority_class / max(num_classes - 1, 1)
    words = "most common" if q == 0 else "rarest" if q == 1 else "common" if q < 0.34 else \
        "intermediate" if q < 0.67 else "rare"
    return f"l = {minority_class} of 0..{num_classes - 1}: {words}"


def method_summary(req: GenerateRequest, num_classes: int) -> str:
    """One phrase with the settings that matter for the request's method."""
    if req.method == "minority guidance":
        if req.spread:
            return (f"minority guidance at l ~ U{{{req.minority_class - req.spread}..{req.minority_class}}} "
                    f"(up to {rarity_label(req.minority_class, num_classes).split(': ')[1]}), w = {req.scale:g}")
        return f"minority guidance at {rarity_label(req.minority_class, num_classes)}, w = {req.scale:g}"
    if req.method == "self-guided":
        return f"self-guided, w = {req.scale:g}, every {req.interval} steps"
    if req.method == "Boost-and-Skip":
        warn = " (meant for the ancestral sampler: with DDIM the boosted variance is never removed)" \
            if req.sampler == "DDIM" and req.gamma != 1 else ""
        return f"Boost-and-Skip, gamma = {req.gamma:g}, skip = {req.skip}{warn}"
    return "standard sampler"


def app_defaults(manifest: dict) -> tuple:
    """(sampler label, steps) the page starts with: the manifest's app.sampler / app.steps when recorded (steps
    clamped to the slider's range), else DEFAULTS."""
    app = manifest.get("app") or {}
    label = {v: k for k, v in SAMPLERS.items()}.get(app.get("sampler"), DEFAULTS["sampler"])
    steps = app.get("steps") if app.get("sampler") in (None, SAMPLERS[label]) else None
    lo, hi = LIMITS["steps"]
    return label, min(max(int(steps), lo), hi) if steps is not None else DEFAULTS["steps"]
