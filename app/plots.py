"""Matplotlib figures for the app (no gradio import): density curves and the 2-D map of the real data."""
from __future__ import annotations

import numpy as np

COLOURS = {"real data": "0.35", "your image": "tab:red", "standard": "tab:blue", "minority guidance": "tab:red", "self-guided": "tab:green",
           "Boost-and-Skip": "tab:orange"}
MARKERS = {"your image": "*", "standard": "o", "minority guidance": "*", "self-guided": "^", "Boost-and-Skip": "s"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def density_figure(values: dict, feature_space: str = "minority classifier features"):
    """Density curves (Figure 3 style) of AvgkNN and LOF, plus estimated severity when present.
    ``values``: {series: {'AvgkNN': (N,), 'LOF': (N,), ['severity': (N,)]}}."""
    from core.evaluation.evaluate import density_curves

    panels = [("AvgkNN", "AvgkNN (k=5): higher = rarer"), ("LOF", "LOF (k=20): higher = rarer")]
    if "severity" in values.get("real data", {}):
        panels.append(("severity", "estimated atrophy severity"))
    return density_curves(values, panels, f"Density in the bundle's feature space ({feature_space})", COLOURS)


def map_figure(points: dict, title: str = "Real data (2-D map); your samples placed by their nearest real images"):
    """The precomputed 2-D map of the real data coloured by minority score, with generated samples (or an
    uploaded image, series 'your image') on it."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=100)
    coords, score = points["real"]
    order = np.argsort(score)  # rarest drawn last, on top
    sc = ax.scatter(coords[order, 0], coords[order, 1], c=score[order], s=5, cmap="viridis", alpha=0.8)
    fig.colorbar(sc, ax=ax, label="minority score (higher = more unique)")
    for name, p in points.items():
        if name == "real":
            continue
        hollow = name == "standard"
        ax.scatter(p[:, 0], p[:, 1], s=60 if MARKERS.get(name) == "*" else 36, marker=MARKERS.get(name, "D"),
                   facecolors="none" if hollow else COLOURS.get(name), edgecolors=COLOURS.get(name) if hollow
                   else "white", linewidths=1.5 if hollow else 0.5,
                   label=name if name.startswith("your") else f"your {name} samples ({len(p)})")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    if len(points) > 1:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig
