"""Evaluation metrics of Section 4.1 / Appendix C: features, neighbourhood density (AvgkNN, LOF,
Rarity Score) and quality against the real data (FID, sFID, improved precision and recall).

Everything here works on feature arrays float (N, D) and never builds an N x N matrix: distances
are taken in row chunks of at most ``CHUNK`` rows. Higher AvgkNN / LOF / Rarity = rarer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from core.errors import DataError, OfflineError
from core.maths.score import _offline

FEATURES = ("resnet50-random", "resnet50", "inception", "inception-fid", "inception-random", "classifier", "pixels")
# the TF FID Inception graph ported to PyTorch (pytorch-fid; torch-fidelity ships the same file, same hash)
FID_INCEPTION_FILES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
SFID_LAYER = "Mixed_6d.branch1x1"  # TF's mixed_6/conv (ADM's evaluator, the paper's sFID): 192 x 17 x 17 at 299 px
CHUNK = 1024  # rows of a distance block: CHUNK x N float64 at a time
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPATIAL_CHANNELS = 7  # sFID keeps the first 7 channels of an intermediate map (Nash et al. 2021)


# ----------------------------------------------------------------------------------------------
# feature extractors


@dataclass
class FeatureExtractor:
    """``fn(x)`` maps float images (N, C, H, W) in [-1, 1] to (pooled (N, D), spatial (N, Ds))."""

    name: str
    fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Features:
    """Features of one image set: pooled float32 (N, D) for density/FID/PR, spatial float32 (N, Ds) for sFID."""

    pooled: np.ndarray
    spatial: np.ndarray


def _imagenet_input(x: torch.Tensor, size: int, inception: bool = False) -> torch.Tensor:
    """[-1, 1] (N, 1|3, H, W) -> (N, 3, size, size): grey repeated to 3 channels, bicubic antialiased resize
    (as clean-fid argues: no aliasing when downsampling), then ImageNet mean/std normalisation, or for
    Inception-v3's ported TF weights the (x - 0.5) / 0.5 they were trained with (torchvision's transform_input)."""
    x = (x.float() + 1) / 2
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    x = x.clamp(0, 1)
    if inception:
        return (x - 0.5) / 0.5
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _pretrained(weights, flag: str):
    """torchvision weights from the local torch hub cache, or a download when online; else OfflineError."""
    file = Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    if not file.is_file() and _offline():
        raise OfflineError(f"--features {flag} needs torchvision's pretrained weights ({file}), which are absent and "
                           "cannot be downloaded offline; use --features resnet50-random or classifier")
    try:
        return weights.get_state_dict(progress=False)  # torchvision's loader (weights-only unpickler)
    except Exception as e:  # noqa: BLE001 - a failed download surfaces as many exception types
        raise OfflineError(f"--features {flag}: cannot load pretrained weights ({type(e).__name__}: {e}); "
                           "use --features resnet50-random or classifier") from None


def _resnet50(pretrained: bool, seed: int, size: int, device) -> FeatureExtractor:
    from torchvision.models import ResNet50_Weights, resnet50

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the random network is a function of the seed
        net = resnet50(weights=None)
    if pretrained:
        net.load_state_dict(_pretrained(ResNet50_Weights.IMAGENET1K_V1, "resnet50"))
    net = net.to(device).eval().requires_grad_(False)

    def fn(x):
        h = net.maxpool(net.relu(net.bn1(net.conv1(_imagenet_input(x, size)))))
        h = net.layer2(net.layer1(h))
        mid = net.layer3(h)
        pooled = torch.flatten(net.avgpool(net.layer4(mid)), 1)
        return pooled, mid[:, :SPATIAL_CHANNELS].flatten(1)

    return FeatureExtractor("resnet50" if pretrained else "resnet50-random", fn,
                            {"input_size": size, "resize": "bicubic, antialiased", "seed": None if pretrained else seed,
                             "pooled": "avgpool (2048)", "spatial": f"layer3[:{SPATIAL_CHANNELS}] flattened",
                             "weights": "IMAGENET1K_V1" if pretrained else "random (kaiming init)"})


def _inception_trunk(net, size: int, pooled_name: str, info: dict) -> Callable:
    """Inception-v3 up to pool3 (2048) for density, FID and precision/recall, plus the sFID map: the first 7
    channels of TF's ``mixed_6/conv`` = ``Mixed_6d.branch1x1`` (the 1x1 branch of the 6th mixed block)."""
    names = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
             "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
             "Mixed_7a", "Mixed_7b", "Mixed_7c"]
    grabbed = []
    net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: grabbed.append(o))

    def fn(x):
        grabbed.clear()
        h = _imagenet_input(x, size, inception=True)
        for n in names:
            h = getattr(net, n)(h)
        return torch.flatten(torch.nn.functional.adaptive_avg_pool2d(h, 1), 1), grabbed[0][:, :SPATIAL_CHANNELS].flatten(1)

    info.update({"input_size": size, "resize": "bicubic, antialiased", "pooled": pooled_name,
                 "spatial": f"{SFID_LAYER}[:{SPATIAL_CHANNELS}] (TF mixed_6/conv)"})
    return fn


def _inception(size: int, device, pretrained: bool = True, seed: int = 0) -> FeatureExtractor:
    """torchvision Inception-v3 (``pretrained=False``: seeded random weights, ``inception-random``)."""
    from torchvision.models import Inception_V3_Weights, inception_v3

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = inception_v3(weights=None, aux_logits=True, init_weights=False)
        if not pretrained:  # variance-preserving random weights: Inception's own init (truncated normal, std 0.1)
            for m in net.modules():  # grows activations ~4x per layer, so pool3 features reached 1e9 and FID 1e19
                if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                    torch.nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
    if pretrained:
        net.load_state_dict(_pretrained(Inception_V3_Weights.IMAGENET1K_V1, "inception"))
    net = net.to(device).eval().requires_grad_(False)
    info = {"weights": "torchvision IMAGENET1K_V1 (not the TF-FID graph)" if pretrained else
            f"random (seed {seed}, Kaiming fan-in init): an offline stand-in, FIDs not comparable with published ones"}
    fn = _inception_trunk(net, size, "pool3 (2048)", info)
    return FeatureExtractor("inception" if pretrained else "inception-random", fn, info)


def fid_inception_file() -> Optional[Path]:
    """The TF-compatible FID Inception weights in the local torch hub cache (pytorch-fid's or torch-fidelity's)."""
    for name in FID_INCEPTION_FILES:
        f = Path(torch.hub.get_dir()) / "checkpoints" / name
        if f.is_file():
            return f
    return None


def _inception_fid(size: int, device) -> FeatureExtractor:
    """pytorch-fid's port of the TF FID Inception graph, from the local cache only (never downloaded at run time)."""
    file = fid_inception_file()
    if file is None:
        where = Path(torch.hub.get_dir()) / "checkpoints"
        raise OfflineError(f"--features inception-fid needs the FID Inception weights ({FID_INCEPTION_FILES[0]} or "
                           f"{FID_INCEPTION_FILES[1]} in {where}; pytorch-fid or torch-fidelity download them once "
                           "online); use --features inception or resnet50-random")
    try:
        from pytorch_fid import inception as pf
    except ImportError:
        raise OfflineError("--features inception-fid needs the pytorch-fid package (pip install pytorch-fid)") from None
    net = pf._inception_v3(num_classes=1008, aux_logits=False, weights=None)  # pytorch-fid's own recipe
    net.Mixed_5b, net.Mixed_5c = pf.FIDInceptionA(192, pool_features=32), pf.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pf.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b, net.Mixed_6c = pf.FIDInceptionC(768, channels_7x7=128), pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d, net.Mixed_6e = pf.FIDInceptionC(768, channels_7x7=160), pf.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b, net.Mixed_7c = pf.FIDInceptionE_1(1280), pf.FIDInceptionE_2(2048)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)  # a plain state dict: no code runs
        net.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - a damaged cache file
        raise OfflineError(f"--features inception-fid: cannot load {file} ({type(e).__name__}: {e})") from None
    net = net.to(device).eval().requires_grad_(False)
    info = {"weights": f"TF FID Inception (pytorch-fid port, {file.name})",
            "note": "resized bicubic with antialiasing as clean-fid does (the paper's cFID); pytorch-fid resizes "
                    "bilinearly, so its FIDs differ slightly"}
    return FeatureExtractor("inception-fid", _inception_trunk(net, size, "pool3 (2048, TF-compatible)", info), info)


def _classifier(classifier, device) -> FeatureExtractor:
    net = classifier.net.to(device).eval()
    if hasattr(net, "feature_space"):  # an imported ADM classifier or minority cascade (core/nets/adm_encoder.py)
        def adm_fn(x):
            t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            pooled, h = net.feature_space(x.float(), t)
            return pooled.float(), h[:, :SPATIAL_CHANNELS].flatten(1).float()

        return FeatureExtractor("classifier", adm_fn, {"input_size": "native", "t": 0,
                                                       "pooled": "ADM attention pool before c_proj",
                                                       "spatial": f"middle block[:{SPATIAL_CHANNELS}]"})
    if net.class_embed is not None:
        raise ValueError("--features classifier needs an unconditional minority classifier; this one is "
                         "class-conditional (use --features resnet50-random)")

    def fn(x):
        t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # clean images: t = 0
        h = net._trunk(x.float(), t, None)
        return net.pool.pooled(h)[:, :, 0].float(), h[:, :SPATIAL_CHANNELS].flatten(1).float()

    return FeatureExtractor("classifier", fn, {"input_size": "native", "t": 0,
                                               "pooled": f"attention-pooled trunk ({net.feature_dim})",
                                               "spatial": f"trunk[:{SPATIAL_CHANNELS}]"})


def make_extractor(name: str, device: str | torch.device = "cpu", seed: int = 0, classifier=None,
                   image_size: Optional[int] = None) -> FeatureExtractor:
    """One of FEATURES. ``classifier`` (a LoadedClassifier) is needed for 'classifier'; ``image_size``
    overrides the network input size (224 for ResNet-50, 299 for Inception-v3)."""
    if name not in FEATURES:
        raise ValueError(f"unknown --features {name!r}; allowed: {', '.join(FEATURES)}")
    if image_size is not None and not 32 <= image_size <= 1024:
        raise ValueError(f"--image-size must be in [32, 1024], got {image_size}")
    if image_size is not None and name.startswith("inception") and image_size < 75:
        raise ValueError(f"--image-size must be at least 75 for the Inception-v3 spaces ({name}), got {image_size}")
    if name == "classifier":
        if classifier is None:
            raise ValueError("--features classifier needs a classifier (--classifier PATH or a bundle as --real)")
        return _classifier(classifier, device)
    if name == "pixels":  # the images themselves, flattened: near-copies in the plainest sense
        return FeatureExtractor("pixels", lambda x: (x.float().flatten(1), x.float().flatten(1)),
                                {"input_size": "native", "pooled": "pixels in [-1, 1], flattened"})
    if name in ("inception", "inception-random"):
        return _inception(image_size or 299, device, pretrained=name == "inception", seed=seed)
    if name == "inception-fid":
        return _inception_fid(image_size or 299, device)
    return _resnet50(name == "resnet50", seed, image_size or 224, device)


def check_images(images: np.ndarray, what: str) -> np.ndarray:
    """uint8 (N, H, W, C) with C in {1, 3} (or (N, H, W)), at least one image; returns NHWC."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise DataError(f"{what}: images must be a uint8 array (N, H, W, C), got "
                        f"{getattr(images, 'dtype', type(images).__name__)}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(f"{what}: images must have shape (N, H, W, C) with C in (1, 3), got {images.shape}")
    if images.shape[0] == 0:
        raise DataError(f"{what}: the set is empty")
    return images


@torch.no_grad()
def extract_features(extractor: FeatureExtractor, images: np.ndarray, batch_size: int = 64,
                     device: str | torch.device = "cpu", progress: Optional[Callable[[int, int], None]] = None) -> Features:
    """Features of uint8 images (N, H, W, C) in [0, 255], in batches; ``progress(done, total)`` after each."""
    images = check_images(images, "features")
    pooled, spatial = [], []
    n = images.shape[0]
    for s in range(0, n, batch_size):
        x = torch.from_numpy(images[s:s + batch_size]).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
        p, q = extractor.fn(x)
        pooled.append(p.float().cpu().numpy())
        spatial.append(q.float().cpu().numpy())
        if progress is not None:
            progress(min(s + batch_size, n), n)
    out = Features(np.concatenate(pooled), np.concatenate(spatial))
    if not (np.isfinite(out.pooled).all() and np.isfinite(out.spatial).all()):
        raise DataError(f"features from {extractor.name} are not finite")
    return out


# ----------------------------------------------------------------------------------------------
# chunked distances


def check_features(x: np.ndarray, what: str, min_n: int = 1) -> np.ndarray:
    """float (N, D), finite, N >= min_n; returned as float64."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise DataError(f"{what}: features must be 2-D (N, D), got shape {x.shape}")
    if x.shape[0] == 0:
        raise DataError(f"{what}: the set is empty")
    if x.shape[0] < min_n:
        raise DataError(f"{what}: {x.shape[0]} samples, fewer than the {min_n} this metric needs (k + 1)")
    x = x.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        raise DataError(f"{what}: features contain NaN or Inf")
    return x


def distance_chunks(a: np.ndarray, b: np.ndarray, chunk: int = CHUNK) -> Iterator[tuple[int, np.ndarray]]:
    """Euclidean distances, (start, D) with D of shape (<= chunk, len(b)); a (N, D), b (M, D) float64."""
    bb = np.einsum("ij,ij->i", b, b)
    for s in range(0, a.shape[0], chunk):
        aa = a[s:s + chunk]
        d2 = np.einsum("ij,ij->i", aa, aa)[:, None] + bb[None, :] - 2.0 * aa @ b.T
        yield s, np.sqrt(np.maximum(d2, 0.0))


def knn_radii(x: np.ndarray, k: int, chunk: int = CHUNK) -> np.ndarray:
    """Distance of each row of x (N, D) to its k-th nearest other row (self excluded by index): (N,)."""
    x = check_features(x, "k-NN radii", min_n=k + 1)
    out = np.empty(x.shape[0])
    for s, d in distance_chunks(x, x, chunk):
        d[np.arange(d.shape[0]), s + np.arange(d.shape[0])] = np.inf
        out[s:s + d.shape[0]] = np.partition(d, k - 1, axis=1)[:, k - 1]
    return out


def _in_any_ball(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, chunk: int = CHUNK) -> np.ndarray:
    """For each point: is it within radii[i] of some centre i? bool (N,)."""
    out = np.empty(points.shape[0], bool)
    for s, d in distance_chunks(points, centres, chunk):
        out[s:s + d.shape[0]] = (d <= radii[None, :]).any(axis=1)
    return out


# ----------------------------------------------------------------------------------------------
# density: AvgkNN, LOF, Rarity Score


def avg_knn(real: np.ndarray, generated: Optional[np.ndarray] = None, k: int = 5) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """AvgkNN (mean distance to the k nearest real samples), PyOD ``KNN(method='mean')`` fitted on real
    (N, D): (real scores with self excluded (N,), generated scores (M,) or None)."""
    from pyod.models.knn import KNN

    real = check_features(real, "AvgkNN real", min_n=k + 1)
    det = KNN(method="mean", n_neighbors=k).fit(real)
    gen = None if generated is None else det.decision_function(check_features(generated, "AvgkNN generated"))
    return np.asarray(det.decision_scores_, np.float64), gen


def lof(real: np.ndarray, generated: Optional[np.ndarray] = None, k: int = 20) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Local outlier factor, PyOD ``LOF(n_neighbors=k)`` fitted on real (N, D): (real (N,), generated (M,) or None);
    about 1 inside a uniform cloud, large for isolated points."""
    from pyod.models.lof import LOF

    real = check_features(real, "LOF real", min_n=k + 1)
    det = LOF(n_neighbors=k).fit(real)
    gen = None if generated is None else det.decision_function(check_features(generated, "LOF generated"))
    return np.asarray(det.decision_scores_, np.float64), gen


@dataclass(frozen=True)
class RarityResult:
    """Rarity Score (Han et al. 2022) per generated sample: float64 (M,), NaN for samples in no real ball;
    ``outside`` counts those."""

    scores: np.ndarray
    outside: int

    @property
    def mean(self) -> float:
        inside = self.scores[np.isfinite(self.scores)]
        return float(inside.mean()) if inside.size else float("nan")


def rarity_score(real: np.ndarray, generated: np.ndarray, k: int = 5, chunk: int = CHUNK) -> RarityResult:
    """Each real sample owns a ball of radius = distance to its k-th nearest real neighbour; a generated
    sample scores the smallest radius among the real balls that contain it (real (N, D), generated (M, D))."""
    real = check_features(real, "rarity real", min_n=k + 1)
    generated = check_features(generated, "rarity generated")
    radii = knn_radii(real, k, chunk)
    scores = np.full(generated.shape[0], np.nan)
    for s, d in distance_chunks(generated, real, chunk):
        masked = np.where(d <= radii[None, :], radii[None, :], np.inf)
        best = masked.min(axis=1)
        scores[s:s + d.shape[0]] = np.where(np.isfinite(best), best, np.nan)
    return RarityResult(scores, int(np.isnan(scores).sum()))


# ----------------------------------------------------------------------------------------------
# quality: FID, sFID, precision, recall


def gaussian_stats(x: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of x (N, D), accumulated in float64 chunks."""
    x = np.asarray(x)
    n, dim = x.shape
    if n < 2:
        raise DataError(f"FID needs at least 2 samples per set, got {n}")
    mu = x.mean(axis=0, dtype=np.float64)
    cov = np.zeros((dim, dim))
    for s in range(0, n, chunk):
        c = x[s:s + chunk].astype(np.float64) - mu
        cov += c.T @ c
    return mu, cov / (n - 1)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), square roots by symmetric eigendecomposition
    (stable where scipy.linalg.sqrtm of S1 S2 goes complex)."""
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    w = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_cross = float(np.sqrt(np.clip(w, 0, None)).sum())
    d = float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_cross)
    return max(d, 0.0)


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to features a (N, D) and b (M, D)."""
    a, b = check_features(a, "FID set 1", 2), check_features(b, "FID set 2", 2)
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def precision_recall(real: np.ndarray, generated: np.ndarray, k: int = 5, chunk: int = CHUNK) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): the share of generated samples inside the
    real k-NN manifold, and of real samples inside the generated one (real (N, D), generated (M, D))."""
    real = check_features(real, "precision/recall real", min_n=k + 1)
    generated = check_features(generated, "precision/recall generated", min_n=k + 1)
    precision = _in_any_ball(generated, real, knn_radii(real, k, chunk), chunk).mean()
    recall = _in_any_ball(real, generated, knn_radii(generated, k, chunk), chunk).mean()
    return float(precision), float(recall)


def top_unique(scores: np.ndarray, top: float) -> np.ndarray:
    """Indices of the most unique samples by a density score (N,), highest first: ``top`` in (0, 1] is a
    fraction (1.0 = all), an integer > 1 a count."""
    n = scores.shape[0]
    if top <= 0:
        raise ValueError(f"--baseline-top must be a fraction in (0, 1] or a count > 1, got {top}")
    count = math.ceil(top * n) if top <= 1 else int(top)
    if top > 1 and (top != int(top) or count > n):
        raise ValueError(f"--baseline-top {top}: a count must be an integer <= the {n} real samples")
    return np.argsort(-scores, kind="stable")[:count]
