"""A long-tailed brain-MRI atrophy data set with ground truth, built from the MNI152 templates that
nilearn ships inside its package (T1, grey- and white-matter maps, 1 mm, 197x233x189; no download).

Each image is an axial T1 slice near the lateral ventricles with a known atrophy ``severity`` in
[0, 1], rendered the way atrophy shows on T1: tissue replaced by dark CSF as enlarged ventricles,
widened sulci and a thinner cortex (brain shrinking from its surface). Nuisance variation: slice
position within a band, rotation, shift, intensity scale, a smooth multiplicative bias field and
Rician-like noise. Each slice is then min-max normalised to [0, 1] (Section C), which removes the
global intensity scale, as for real MRI input. Deterministic for a seed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

Z_BAND = (80, 100)  # axial slices (voxel index) around the bodies of the lateral ventricles
# Atrophy at severity 1 (end-stage: ventricles about three times their volume, knife-blade gyri, a wide CSF
# rim). At 32x32 one pixel is ~7 mm, so with the smaller magnitudes of earlier builds (6/3/4 mm) mild atrophy
# (severity < 0.25, 83 % of the slices) changed the image by well under a pixel and could not be ranked at all
# (docs/RESULTS.md, issue 3, "phantom v3").
MAX_VENTRICLE_MM = 9.0  # dilation of the ventricles at severity 1
MAX_SULCUS_MM = 7.0  # widening of sulcal CSF into cortex at severity 1
MAX_THINNING_MM = 10.0  # cortex lost from the outer surface at severity 1
CSF_LEVEL = 0.12  # T1 intensity of CSF relative to white matter ~1
MAX_ROTATION_DEG = 3.0  # residual rotation after affine registration to MNI (as preprocessed ADNI)
MAX_SHIFT_MM = 2.0  # residual translation after registration
MAX_BIAS = 0.08  # residual bias-field strength after N4-style correction


def _templates():
    import nibabel as nib
    import nilearn

    folder = Path(nilearn.__file__).parent / "datasets" / "data"
    names = {k: folder / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
    missing = [str(p) for p in names.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"nilearn's MNI152 templates are missing: {missing[0]} (pip install nilearn)")
    return {k: np.asarray(nib.load(str(p)).dataobj, dtype=np.float32) / 255.0 for k, p in names.items()}


@dataclass(frozen=True)
class SliceMaps:
    """Per-slice maps (H, W) precomputed once: intensity and distances (mm) that make atrophy cheap."""

    t1: np.ndarray  # template T1, ~1 in white matter
    brain: np.ndarray  # bool, brain incl. internal CSF
    csf_level: float  # T1 intensity of ventricular CSF in this slice
    d_ventricle: np.ndarray  # distance to the ventricles
    d_sulcus: np.ndarray  # distance to sulcal CSF
    d_outside: np.ndarray  # distance from outside the brain (depth into it)


def slice_maps(tpl: dict, z: int) -> SliceMaps:
    from scipy import ndimage as ndi

    t1, gm, wm = (np.rot90(tpl[k][:, :, z]).copy() for k in ("t1", "gm", "wm"))
    t1 = t1 / max(np.percentile(t1[wm > 0.9], 50), 1e-6)  # white matter ~ 1
    brain = ndi.binary_fill_holes(ndi.binary_closing(t1 > 0.25, iterations=3))
    brain = ndi.binary_opening(brain, iterations=2)
    csf_prob = np.clip(1 - gm - wm, 0, 1)
    csf = brain & (csf_prob > 0.5) & (t1 < 0.7)
    labels, n = ndi.label(csf)
    h, w = t1.shape
    yy, xx = np.mgrid[:h, :w]
    cy, cx = ndi.center_of_mass(brain)
    central = ((yy - cy) / (0.28 * h)) ** 2 + ((xx - cx) / (0.18 * w)) ** 2 < 1
    ventricle = np.zeros_like(csf)
    for lab in range(1, n + 1):
        comp = labels == lab
        if comp.sum() >= 15 and central[comp].mean() > 0.8:
            ventricle |= comp
    sulcus = csf & ~ventricle
    return SliceMaps(
        t1=t1.astype(np.float32), brain=brain, csf_level=float(np.median(t1[ventricle])) if ventricle.any() else 0.2,
        d_ventricle=ndi.distance_transform_edt(~ventricle).astype(np.float32),
        d_sulcus=ndi.distance_transform_edt(~sulcus).astype(np.float32),
        d_outside=ndi.distance_transform_edt(brain).astype(np.float32),
    )


def atrophy_fields(m: SliceMaps, severity: float) -> dict:
    """What ``severity`` changes, float (H, W) in [0, 1] each: "ventricles" (deep tissue the growing ventricles
    turn to CSF), "sulci" (tissue the widening sulci turn to CSF) and "cortex" (the outer cortex removed)."""
    soft = lambda r, d: np.clip(r - d + 0.5, 0.0, 1.0) if r > 0 else np.zeros_like(d)  # noqa: E731
    r_v, r_s, r_c = severity * MAX_VENTRICLE_MM, severity * MAX_SULCUS_MM, severity * MAX_THINNING_MM
    inner = m.d_outside > 6  # ventricles grow into deep tissue only
    return {"ventricles": soft(r_v, m.d_ventricle) * inner * m.brain,
            "sulci": soft(r_s, m.d_sulcus) * (m.d_outside < 14) * m.brain,
            "cortex": soft(r_c, m.d_outside) * m.brain}  # outer cortex lost: CSF, then background at the very edge


def render_atrophy(m: SliceMaps, severity: float) -> np.ndarray:
    """The slice with tissue turned to CSF by ``severity`` in [0, 1]; float (H, W), background 0."""
    f = atrophy_fields(m, severity)
    to_csf, shrink = np.maximum(f["ventricles"], f["sulci"]), f["cortex"]
    csf = min(m.csf_level, CSF_LEVEL * 2)
    img = m.t1 * (1 - to_csf) + csf * to_csf
    img = img * (1 - shrink) + 0.5 * csf * shrink
    return np.where(m.brain, img, 0.0).astype(np.float32)


def draw_severity(rng: np.random.Generator, n: int) -> np.ndarray:
    """Long-tailed: 90 % Beta(1.2, 10) (none to mild), 10 % U(0.25, 1) (moderate to severe)."""
    tail = rng.random(n) < 0.10
    return np.where(tail, rng.uniform(0.25, 1.0, n), rng.beta(1.2, 10.0, n))


def _bias_field(rng: np.random.Generator, h: int, w: int, strength: float) -> np.ndarray:
    yy, xx = np.mgrid[-1:1:complex(0, h), -1:1:complex(0, w)]
    c = rng.normal(0, 1, 5)
    field = c[0] * xx + c[1] * yy + c[2] * xx * yy + c[3] * xx ** 2 + c[4] * yy ** 2
    field = field / (np.abs(field).max() + 1e-6)
    return (1 + strength * field).astype(np.float32)


def make_sample(maps: SliceMaps, severity: float, rng: np.random.Generator, size: int,
                masks: Optional[dict] = None) -> tuple[np.ndarray, dict]:
    """One uint8 (size, size) image and its nuisance parameters. ``masks`` (a dict, filled when given; the same
    random draws either way) receives bool (size, size) masks moved and resized as the image is (> 0.5 after
    resizing): "ventricles", "sulci", "cortex" (atrophy_fields), "changed" (their union) and "brain"."""
    from PIL import Image
    from scipy import ndimage as ndi

    img = render_atrophy(maps, severity)
    angle = float(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
    shift = rng.uniform(-MAX_SHIFT_MM, MAX_SHIFT_MM, 2)
    if masks is not None:
        fields = atrophy_fields(maps, severity)
        fields["changed"] = np.maximum.reduce(list(fields.values()))
        fields["brain"] = maps.brain.astype(np.float32)
        for name, field in fields.items():
            f = ndi.shift(ndi.rotate(field, angle, reshape=False, order=1, mode="constant"), shift, order=1,
                          mode="constant")
            side = max(f.shape)
            canvas = np.zeros((side, side), np.float32)
            canvas[(side - f.shape[0]) // 2:(side - f.shape[0]) // 2 + f.shape[0],
                   (side - f.shape[1]) // 2:(side - f.shape[1]) // 2 + f.shape[1]] = f
            masks[name] = np.asarray(Image.fromarray(canvas, mode="F").resize((size, size), Image.Resampling.BILINEAR)) > 0.5
    img = ndi.rotate(img, angle, reshape=False, order=1, mode="constant")
    img = ndi.shift(img, shift, order=1, mode="constant")
    h, w = img.shape
    scale = float(rng.uniform(0.85, 1.15))
    bias = float(rng.uniform(0.0, MAX_BIAS))
    img = img * scale * _bias_field(rng, h, w, bias)
    sigma = float(rng.uniform(0.01, 0.04))
    noisy = np.hypot(img + rng.normal(0, sigma, img.shape), rng.normal(0, sigma, img.shape))  # Rician
    side = max(h, w)
    canvas = np.zeros((side, side), np.float32)
    canvas[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = noisy
    small = np.asarray(Image.fromarray(canvas, mode="F").resize((size, size), Image.Resampling.LANCZOS))
    lo, hi = float(small.min()), float(small.max())  # per-slice min-max to [0, 1], as Section C does for MRI
    out = np.clip((small - lo) / max(hi - lo, 1e-6) * 255, 0, 255).round().astype(np.uint8)
    return out, {"angle": round(angle, 3), "shift_x": round(float(shift[1]), 3), "shift_y": round(float(shift[0]), 3),
                 "intensity": round(scale, 4), "bias": round(bias, 4), "noise": round(sigma, 4)}


def build_mri_phantom(out: str | os.PathLike, n: int = 6000, size: int = 32, seed: int = 0,
                      progress: Optional[Callable[[int, int], None]] = None,
                      masks: Optional[str | os.PathLike] = None) -> Path:
    """Write ``n`` PNGs and ``metadata.csv`` (path, severity, z, nuisance parameters) to ``out``; with ``masks``,
    also each slice's "changed" and "brain" masks (make_sample) as MASKS/changed/NNNNN.png, MASKS/brain/NNNNN.png
    (0 / 255; the same images either way)."""
    from core.demos import write_image, write_metadata

    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if not 8 <= size <= 256:
        raise ValueError(f"--size must be in [8, 256], got {size}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    tpl = _templates()
    maps = {z: slice_maps(tpl, z) for z in range(Z_BAND[0], Z_BAND[1] + 1)}
    rng = np.random.default_rng(seed)
    severity = draw_severity(rng, n)
    zs = rng.integers(Z_BAND[0], Z_BAND[1] + 1, n)
    rows = []
    for i in range(n):
        m = {} if masks is not None else None
        img, nuisance = make_sample(maps[int(zs[i])], float(severity[i]), rng, size, masks=m)
        rel = write_image(out, i, img)
        if m is not None:
            for kind in ("changed", "brain"):
                write_image(Path(masks) / kind, i, (m[kind] * 255).astype(np.uint8), folder="")
        rows.append({"path": rel, "severity": round(float(severity[i]), 5), "z": int(zs[i]), **nuisance})
        if progress is not None:
            progress(i + 1, n)
    write_metadata(out, rows)
    return out
