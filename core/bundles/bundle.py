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

from core.nets.checkpoint import load_tensors, read_json
from core.errors import CheckpointError

BUNDLE_SCHEMA = 1
BUNDLE_FILES = ("model.json", "model.safetensors", "classifier.json", "classifier.safetensors",
                "real.safetensors", "real.csv")
REAL_KEYS = ("score", "label", "severity", "coords", "pca_mean", "pca_components")  # + images or images_deflate


def pack_images(images: np.ndarray) -> dict:
    """uint8 images (N, H, W, C) as safetensors entries: ``images_deflate`` (zlib level 9 of the raw bytes, uint8)
    and ``images_shape`` (int64 (4,)); flat-coloured images shrink 3x (the faces: 24.6 -> 8.9 MB)."""
    import zlib

    images = np.ascontiguousarray(images, dtype=np.uint8)
    packed = np.frombuffer(zlib.compress(images.tobytes(), 9), dtype=np.uint8)
    return {"images_deflate": torch.from_numpy(packed.copy()), "images_shape": torch.tensor(images.shape, dtype=torch.int64)}


def unpack_images(t: dict, source: str) -> np.ndarray:
    """The real images of a real.safetensors: plain ``images``, or ``images_deflate`` inflated to exactly the
    size ``images_shape`` promises (never more: a damaged or hostile stream is refused, not expanded)."""
    import zlib

    if "images" in t:
        return t["images"].numpy()
    if "images_deflate" not in t or "images_shape" not in t:
        raise CheckpointError(f"{source}: missing key 'images'")
    shape = tuple(int(v) for v in t["images_shape"].tolist())
    if len(shape) != 4 or min(shape) < 1 or shape[3] not in (1, 3):
        raise CheckpointError(f"{source}: images_shape {shape} is not (N, H, W, 1 or 3)")
    want = int(np.prod(shape, dtype=np.int64))
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
    """Validate the manifest (schema, files present, hashes) and return it; CheckpointError otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"--bundle {root}: no such folder")
    manifest = read_json(root / "manifest.json")
    version = manifest.get("schema_version")
    if version != BUNDLE_SCHEMA:
        raise CheckpointError(f"{root / 'manifest.json'}: bundle schema version {version!r} is not supported "
                              f"(this version reads {BUNDLE_SCHEMA})")
    hashes = manifest.get("files")
    if not isinstance(hashes, dict):
        raise CheckpointError(f"{root / 'manifest.json'}: no 'files' table of sha256 sums")
    for name in BUNDLE_FILES:  # every file the loader reads must be listed and match: nothing loads unchecked
        if not (root / name).is_file():
            raise CheckpointError(f"--bundle {root}: missing file {name}")
        if name not in hashes:
            raise CheckpointError(f"{root / 'manifest.json'}: lists no sha256 for {name}; the bundle is refused")
        if sha256_file(root / name) != hashes[name]:
            raise CheckpointError(f"--bundle {root}: {name} does not match the manifest's sha256 (damaged or edited)")
    return manifest


def truth_column(manifest: dict) -> Optional[str]:
    """The bundle's ground-truth column: the manifest's ``dataset.truth`` (written by ``build``), or
    ``severity`` for MRI bundles from before ``build`` (their dataset names a ``ground_truth``)."""
    dataset = manifest.get("dataset") or {}
    if "truth" in dataset:
        return dataset["truth"]
    return "severity" if dataset.get("ground_truth") else None


def load_real(root: Path, manifest: Optional[dict] = None) -> RealData:
    """The real data of a bundle folder; ``manifest`` (default: read from the folder) names the truth column."""
    import csv

    if manifest is None:
        manifest = read_json(root / "manifest.json")
    t = load_tensors(root / "real.safetensors")
    missing = [k for k in REAL_KEYS if k not in t]
    if missing:
        raise CheckpointError(f"{root / 'real.safetensors'}: missing key {missing[0]!r}")
    with open(root / "real.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = list(reader.fieldnames or [])
    paths = [r["path"] for r in rows]
    images = unpack_images(t, str(root / "real.safetensors"))
    n = images.shape[0]
    if len(paths) != n or any(t[k].shape[0] != n for k in ("score", "label", "severity", "coords")):
        raise CheckpointError(f"--bundle {root}: real.csv and real.safetensors disagree on the number of images")
    metadata = {}
    for col in header:
        if col in ("path", "score", "label", "x", "y"):
            continue
        try:
            metadata[col] = np.array([float(r[col]) if r[col] not in ("", None) else np.nan for r in rows])
        except ValueError:
            continue  # a non-numeric column is for people only
    truth_name = truth_column(manifest)
    return RealData(paths, images, t["score"].numpy(), t["label"].numpy(), t["severity"].numpy(),
                    t["coords"].numpy(), t["pca_mean"].numpy(), t["pca_components"].numpy(), truth_name, metadata)


def load_bundle(root: str | os.PathLike, device: str | torch.device = "cpu", load_models: bool = True) -> Bundle:
    """One call: validate and load a bundle (never unpickles)."""
    from core.nets.models import load_classifier, load_diffusion

    root = Path(root)
    manifest = check_bundle(root)
    model = load_diffusion(root, device) if load_models else None
    classifier = load_classifier(root, device) if load_models else None
    return Bundle(root, manifest, model, classifier, load_real(root, manifest))


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
