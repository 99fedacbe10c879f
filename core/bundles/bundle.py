"""A bundle: everything the app and ``sample --bundle`` need, in one folder of safetensors + JSON.

    manifest.json            schema version, data set, sizes, schedule, L, thresholds, score settings,
                             seeds, training steps, package versions, sha256 of every file below
    model.json/.safetensors  the diffusion model (EMA weights), as a run folder
    classifier.json/.safetensors  the minority classifier, as a classifier folder
    real.safetensors         the scored real data: images uint8 (N, H, W, C) (plain, or deflated with their
                             shape: pack_images), score, label, severity (the
                             --truth column's values, NaN without one; the key keeps the MRI bundle's name),
                             coords (N, 2) of the precomputed 2-D map, and the PCA basis behind it
    real.csv                 the same table for people: path, score, label, every numeric metadata.csv
                             column of the data (the truth among them), x, y
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from core.bundles.manifest import BUNDLE_FILES, check_column, check_rel_path, member, validate_manifest
from core.nets.checkpoint import load_tensors, read_json
from core.errors import CheckpointError

BUNDLE_SCHEMA = 1
MAX_IMAGE_BYTES = 4 << 30  # real images a bundle may inflate to (the faces bundle: 24.6 MB)
REAL_KEYS = ("score", "label", "severity", "coords", "pca_mean", "pca_components")  # + images or images_deflate


def pack_images(images: np.ndarray) -> dict:
    """uint8 images (N, H, W, C) as safetensors entries: ``images_deflate`` (zlib level 9 of the raw bytes, uint8)
    and ``images_shape`` (int64 (4,)); flat-coloured images shrink 3x (the faces: 24.6 -> 8.9 MB)."""
    import zlib

    images = np.ascontiguousarray(images, dtype=np.uint8)
    packed = np.frombuffer(zlib.compress(images.tobytes(), 9), dtype=np.uint8)
    return {"images_deflate": torch.from_numpy(packed.copy()), "images_shape": torch.tensor(images.shape, dtype=torch.int64)}


def unpack_images(t: dict, source: str, expect: Optional[tuple] = None) -> np.ndarray:
    """The real images of a real.safetensors: plain ``images``, or ``images_deflate`` inflated to exactly the
    size ``images_shape`` promises (never more: a damaged or hostile stream is refused, not expanded).
    ``expect`` (H, W, C), when given, must be the images' shape, checked before anything is inflated."""
    import zlib

    if "images" in t:
        images = t["images"].numpy()
        if images.dtype != np.uint8 or images.ndim != 4 or (expect is not None and images.shape[1:] != tuple(expect)):
            raise CheckpointError(f"{source}: images {images.dtype} {tuple(images.shape)} are not uint8 (N, {expect or 'H, W, C'})")
        return images
    if "images_deflate" not in t or "images_shape" not in t:
        raise CheckpointError(f"{source}: missing key 'images'")
    if t["images_shape"].dtype != torch.int64 or t["images_shape"].shape != (4,) or t["images_deflate"].dtype != torch.uint8:
        raise CheckpointError(f"{source}: images_shape must be int64 (4,) and images_deflate uint8")
    shape = tuple(int(v) for v in t["images_shape"].tolist())
    if len(shape) != 4 or min(shape) < 1 or shape[3] not in (1, 3):
        raise CheckpointError(f"{source}: images_shape {shape} is not (N, H, W, 1 or 3)")
    if expect is not None and shape[1:] != tuple(expect):
        raise CheckpointError(f"{source}: images_shape {shape} does not match the manifest's (N, {', '.join(map(str, expect))})")
    want = int(np.prod(shape, dtype=np.int64))
    if want > MAX_IMAGE_BYTES:
        raise CheckpointError(f"{source}: images_shape {shape} promises {want / 2**30:.1f} GiB of images "
                              f"(limit {MAX_IMAGE_BYTES / 2**30:.0f} GiB)")
    d = zlib.decompressobj()
    try:
        raw = d.decompress(t["images_deflate"].numpy().tobytes(), want + 1)
    except zlib.error as e:
        raise CheckpointError(f"{source}: images_deflate is damaged ({e})") from None
    if len(raw) != want or not d.eof:
        raise CheckpointError(f"{source}: images_deflate holds {'more' if len(raw) > want else 'less'} than images_shape {shape}")
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape).copy()


@dataclass(frozen=True)
class RealData:
    """The bundle's real data: images uint8 (N, H, W, C); score float32 (N,); label int64 (N,) in [0, L);
    truth float32 (N,): the ground-truth column named ``truth_name`` (MRI: atrophy severity in [0, 1]; NaN when
    the bundle has none); coords float32 (N, 2); pca_* project pixels to the map's input; ``metadata``: every
    numeric column of real.csv beyond path/score/label/x/y, float64 (N,) with NaN where unknown."""

    paths: list
    images: np.ndarray
    score: np.ndarray
    label: np.ndarray
    truth: np.ndarray
    coords: np.ndarray
    pca_mean: np.ndarray
    pca_components: np.ndarray
    truth_name: Optional[str] = None
    metadata: dict = field(default_factory=dict)
    row: Optional[np.ndarray] = None  # int64 (N,): each image's noise slot (its folder listing's; default 0..N-1)

    def __post_init__(self):
        if self.row is None:
            object.__setattr__(self, "row", np.arange(len(self.score)))

    @property
    def has_truth(self) -> bool:
        return self.truth_name is not None and bool(np.isfinite(self.truth).all())


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: dict
    model: object  # DiffusionModel (None with load_models=False)
    classifier: object  # LoadedClassifier (None with load_models=False)
    real: RealData

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_bundle(root: str | os.PathLike) -> dict:
    """Validate a bundle before anything of it is used (core.bundles.manifest): the manifest a regular file
    whose values pass the schema and its bounds; every file it names a regular file inside the folder (no
    symlink) matching its sha256. Returns the manifest; one CheckpointError line otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"--bundle {root}: no such folder")
    mpath = root / "manifest.json"
    if mpath.is_symlink() or (mpath.exists() and not mpath.is_file()):
        raise CheckpointError(f"--bundle {root}: manifest.json is a symlink or not a regular file; the bundle is refused")
    manifest = read_json(mpath)
    version = manifest.get("schema_version")
    if version != BUNDLE_SCHEMA:
        raise CheckpointError(f"{mpath}: bundle schema version {version!r} is not supported "
                              f"(this version reads {BUNDLE_SCHEMA})")
    hashes = manifest.get("files")
    if not isinstance(hashes, dict):
        raise CheckpointError(f"{mpath}: no 'files' table of sha256 sums")
    for name in BUNDLE_FILES:  # every file the loader reads must be listed and match: nothing loads unchecked
        if name not in hashes:
            raise CheckpointError(f"{mpath}: lists no sha256 for {name}; the bundle is refused")
    validate_manifest(manifest, str(mpath))
    for name in BUNDLE_FILES:
        if sha256_file(member(root, name)) != hashes[name]:
            raise CheckpointError(f"--bundle {root}: {name} does not match the manifest's sha256 (damaged or edited)")
    for extra in ("model.pending.safetensors", "classifier.pending.safetensors"):
        if os.path.lexists(root / extra):  # the loaders' roll-forward of an interrupted save must not apply here
            raise CheckpointError(f"--bundle {root}: holds {extra}, which no bundle has; the bundle is refused")
    return manifest


def truth_column(manifest: dict) -> Optional[str]:
    """The bundle's ground-truth column: the manifest's ``dataset.truth`` (written by ``build``), or
    ``severity`` for MRI bundles from before ``build`` (their dataset names a ``ground_truth``)."""
    dataset = manifest.get("dataset") or {}
    if "truth" in dataset:
        return dataset["truth"]
    return "severity" if dataset.get("ground_truth") else None


def score_settings(manifest: dict, draws: Optional[int] = None):
    """The manifest's score settings (distance, t, draws, seed, clip) as a ScoreSettings; ``draws`` replaces its
    number of noise draws (the app's captions use fewer)."""
    from core.maths.score import ScoreSettings

    s = manifest["score"]
    return ScoreSettings(distance=s["distance"], t=int(s["t"]), draws=int(draws or s["draws"]), seed=int(s["seed"]),
                         clip=bool(s.get("clip", True)))


def load_real(root: Path, manifest: Optional[dict] = None) -> RealData:
    """The real data of a bundle folder, every array checked against the manifest (shapes, dtypes, labels in
    [0, L), finite scores and map) and real.csv's text against its shapes (column names, relative paths);
    ``manifest`` (default: read and validated from the folder) names the truth column."""
    import csv

    if manifest is None:
        manifest = check_bundle(root)
    source = str(root / "real.safetensors")
    t = load_tensors(member(root, "real.safetensors"))
    missing = [k for k in REAL_KEYS if k not in t]
    if missing:
        raise CheckpointError(f"{source}: missing key {missing[0]!r}")
    size, channels = int(manifest["image_size"]), int(manifest.get("channels", 1))
    images = unpack_images(t, source, (size, size, channels))
    n, d = images.shape[0], size * size * channels
    want = {"score": (n,), "label": (n,), "severity": (n,), "coords": (n, 2), "pca_mean": (d,)}
    for k, shape in want.items():
        if tuple(t[k].shape) != shape:
            raise CheckpointError(f"{source}: {k!r} has shape {tuple(t[k].shape)}, expected {shape} for {n} images")
    if t["pca_components"].ndim != 2 or t["pca_components"].shape[1] != d or not 1 <= t["pca_components"].shape[0] <= d:
        raise CheckpointError(f"{source}: 'pca_components' has shape {tuple(t['pca_components'].shape)}, expected (K, {d})")
    for k in ("score", "coords", "pca_mean", "pca_components"):
        if not t[k].is_floating_point() or not torch.isfinite(t[k]).all():
            raise CheckpointError(f"{source}: {k!r} must hold finite floats")
    label = t["label"]
    L = int(manifest["num_classes"])
    if label.is_floating_point() or (n and not (0 <= int(label.min()) and int(label.max()) < L)):
        raise CheckpointError(f"{source}: 'label' must hold integers in [0, {L})")
    csv_path = member(root, "real.csv")
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise CheckpointError(f"{csv_path}: not a readable CSV table ({e})") from None
    if "path" not in header:
        raise CheckpointError(f"{csv_path}: no 'path' column (header: {', '.join(header)[:80]!r})")
    for i, col in enumerate(header):
        check_column(col, f"header column {i + 1}", str(csv_path))
    if len(rows) != n:
        raise CheckpointError(f"--bundle {root}: real.csv and real.safetensors disagree on the number of images")
    paths = [check_rel_path(r["path"], f"row {i + 2} path", str(csv_path)) for i, r in enumerate(rows)]
    metadata = {}
    for col in header:
        if col in ("path", "score", "label", "x", "y"):
            continue
        try:
            metadata[col] = np.array([float(r[col]) if r[col] not in ("", None) else np.nan for r in rows])
        except (TypeError, ValueError):
            continue  # a non-numeric column is for people only
    truth_name = truth_column(manifest)
    row = None
    if "row" in t:  # bundles built since issue 28: the noise slot of each image (older ones: 0..N-1)
        row = t["row"]
        if row.is_floating_point() or tuple(row.shape) != (n,) or (n and (int(row.min()) < 0 or
                                                                         len(torch.unique(row)) != n)):
            raise CheckpointError(f"{source}: 'row' must hold {n} distinct integers >= 0")
        row = row.long().numpy()
    return RealData(paths, images, t["score"].float().numpy(), t["label"].long().numpy(), t["severity"].float().numpy(),
                    t["coords"].float().numpy(), t["pca_mean"].float().numpy(), t["pca_components"].float().numpy(),
                    truth_name, metadata, row)


def real_scores(root: Path) -> np.ndarray:
    """The scores float64 (N,) of a checked bundle's real images, read alone through safetensors' lazy reader (the
    images are neither read nor inflated: ``score --bundle`` against a 200K-image bundle); checked as load_real
    checks them: 1-D finite floats, one per image that ``images_shape`` (or ``images``) holds."""
    from safetensors import SafetensorError, safe_open

    path = member(Path(root), "real.safetensors")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            score = f.get_tensor("score") if "score" in keys else None
            if "images_shape" in keys:
                shape = f.get_tensor("images_shape")
                n = int(shape[0]) if shape.dtype == torch.int64 and tuple(shape.shape) == (4,) else -1
            else:
                n = f.get_slice("images").get_shape()[0] if "images" in keys else -1
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from None
    if score is None:
        raise CheckpointError(f"{path}: missing key 'score'")
    if not score.is_floating_point() or tuple(score.shape) != (n,) or not torch.isfinite(score).all():
        raise CheckpointError(f"{path}: 'score' must hold one finite float per image (shape {tuple(score.shape)}, "
                              f"{n} images)")
    return score.double().numpy()


def load_bundle(root: str | os.PathLike, device: str | torch.device = "cpu", load_models: bool = True) -> Bundle:
    """One call: validate and load a bundle (never unpickles)."""
    from core.nets.models import load_classifier, load_diffusion

    root = Path(root)
    manifest = check_bundle(root)
    model = load_diffusion(root, device) if load_models else None
    classifier = load_classifier(root, device) if load_models else None
    if load_models:
        check_agrees(root, manifest, model, classifier)
    return Bundle(root, manifest, model, classifier, load_real(root, manifest))


def check_agrees(root: Path, manifest: dict, model, classifier) -> None:
    """The manifest's sizes, schedule and L agree with the model and classifier it ships (both hashed, but
    the manifest's own values are not), so no stranger's number reaches a sampler or the UI's sliders."""
    L = int(manifest["num_classes"])
    facts = [("image_size", int(manifest["image_size"]), model.image_size),
             ("channels", int(manifest.get("channels", 1)), model.channels),
             ("T", int(manifest["T"]), model.schedule.T),
             ("num_classes", L, int(classifier.net.cfg.num_outputs))]
    for key, said, real in facts:
        if said != real:
            raise CheckpointError(f"{root / 'manifest.json'}: {key!r} is {said} but the bundle's "
                                  f"{'classifier' if key == 'num_classes' else 'model'} has {real}")


def project(real: RealData, images_u8: np.ndarray, k: int = 10) -> np.ndarray:
    """Place images (N, H, W, C) uint8 on the bundle's 2-D map: mean coords of their k nearest real
    images in the map's PCA space. Returns float32 (N, 2)."""
    x = images_u8.reshape(len(images_u8), -1).astype(np.float32) / 255.0
    z = (x - real.pca_mean) @ real.pca_components.T
    zr = (real.images.reshape(len(real.images), -1).astype(np.float32) / 255.0 - real.pca_mean) @ real.pca_components.T
    d = (z ** 2).sum(1)[:, None] - 2 * z @ zr.T + (zr ** 2).sum(1)[None]
    nn = np.argpartition(d, kth=min(k, len(zr) - 1), axis=1)[:, :k]
    return real.coords[nn].mean(1).astype(np.float32)


def resolve(bundle: Optional[str], model: Optional[str], classifier: Optional[str]) -> tuple[str, Optional[str]]:
    """``--bundle B`` stands for ``--model B --classifier B`` after the manifest is checked."""
    if bundle is None:
        if model is None:
            raise ValueError("pass --model (or --bundle)")
        return model, classifier
    if model is not None:
        raise ValueError("pass either --bundle or --model, not both")
    check_bundle(bundle)
    return bundle, classifier or bundle
