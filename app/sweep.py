"""The level sweep (issue 26.3; the paper's Figures 15 and 16): one seed shown at five target classes l, or at five
guidance scales w, each with its minority score and, on a bundle with a severity truth, its estimated atrophy."""
from __future__ import annotations

import numpy as np

from . import handlers as h

SWEEP_KINDS = ("class l (w fixed)", "scale w (l fixed)")
W_LEVELS = (0.0, 1.0, 2.0, 3.0, 4.0)


def levels(kind: str, num_classes: int) -> list:
    """The five levels of a sweep: l = 0, L/4, L/2, 3L/4, L - 1, or w = 0 ... 4. MinorityError naming the kinds."""
    if kind == SWEEP_KINDS[0]:
        L = num_classes
        return sorted({0, L // 4, L // 2, (3 * L) // 4, L - 1})
    if kind == SWEEP_KINDS[1]:
        return list(W_LEVELS)
    raise h.MinorityError(f"unknown sweep {h.clip_text(kind)!r}; allowed: {', '.join(SWEEP_KINDS)}")


def sweep(studio: h.Studio, kind: str, minority_class, scale, steps, seed, sampler):
    """(uint8 images (5, H, W, C), the requests, scores (5,), estimated atrophy (5,) or None): minority guidance
    from one seed at each level. Each image is its own n = 1 run from the same generator seed, so every sampler
    (the stochastic ones too) starts each level from the same noise."""
    L = studio.bundle.num_classes
    base = h.GenerateRequest(minority_class, scale, steps, 1, seed, sampler).check(L)
    reqs = [h.GenerateRequest(v if kind == SWEEP_KINDS[0] else base.minority_class,
                              base.scale if kind == SWEEP_KINDS[0] else v, base.steps, 1, base.seed, base.sampler).check(L)
            for v in levels(kind, L)]
    images = np.concatenate([studio._sample(r, studio.guidance(r), lambda step: None, None) for r in reqs])
    return images, reqs, studio.score(images, base.seed), studio.atrophy(images)


def on_sweep(studio: h.Studio, kind, minority_class, scale, steps, seed, sampler) -> tuple:
    """(gallery items, caption markdown) for the Sweep button."""
    images, reqs, scores, atrophy = sweep(studio, kind, minority_class, scale, steps, seed, sampler)
    by_class = kind == SWEEP_KINDS[0]

    def caption(i):  # short enough for a fifth of the grid: "l 49 · 0.216 · 0.74"
        r = reqs[i]
        text = f"l {r.minority_class}" if by_class else f"w {r.scale:g}"
        return text + f" · {scores[i]:.3f}" + (f" · {atrophy[i]:.2f}" if atrophy is not None else "")

    r0 = reqs[0]
    fixed = f"w = {r0.scale:g}" if by_class else f"l = {r0.minority_class}"
    return ([(h.display(im), caption(i)) for i, im in enumerate(images)],
            f"Seed {r0.seed}, {r0.steps} {r0.sampler} steps, minority guidance at {fixed}: the same noise at every "
            "level. Captions: " + ("l" if by_class else "w") + " · minority score" + (" · estimated atrophy (0 … 1)."
                                                                                  if atrophy is not None else "."))
