"""Minority score (Eq. 7; class-conditional Eq. 16) and the distances d(x0, x0_hat) it can use.

``l(x0) = E_eps[ d(x0, x0_hat(x_t)) ]`` with x_t = q_sample(x0, t, eps) and x0_hat by Tweedie.
Noise for image i comes from its own generator seeded from (seed, i), so scores do not depend on
batch size, order or how many processes share the work.
"""
from __future__ import annotations

import os
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from core.errors import OfflineError

DISTANCES = ("lpips", "lpips-alex", "lpips-rand", "unet-feat", "ssim", "l2", "l1")
Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16, the trunk of LPIPS-VGG
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's ImageNet AlexNet, the trunk of LPIPS-Alex
TRUNK_FILES = {"vgg": VGG16_FILE, "alex": ALEXNET_FILE}


# a distance whose definition changed: its version is stored with every score, so work made with an older
# definition is recomputed, not reused (lpips-rand 2: uniform channel weights; 1 had random, signed heads)
DISTANCE_VERSIONS = {"lpips-rand": 2}
# the score's backbone and unet-feat run in fp32 even where sampling uses bf16 (CUDA): measured on the MRI bundle,
# bf16 lowered Spearman(score, severity) from +0.517 to +0.495 and moved 56 % of slices to another of 50 classes
SCORE_PRECISION = "fp32"


@dataclass(frozen=True)
class ScoreSettings:
    """How a minority score was computed; stored beside every score table."""

    distance: str = "lpips"  # one of DISTANCES
    t: int = 600  # perturbation timestep in [0, T)
    draws: int = 5  # noise draws averaged per image
    seed: int = 0
    clip: bool = True  # clip x0_hat to [-1, 1]

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.distance in DISTANCE_VERSIONS:
            d["distance_version"] = DISTANCE_VERSIONS[self.distance]
        return d


def _offline() -> bool:
    return any(os.environ.get(k, "0") not in ("0", "", "false", "False") for k in ("HF_HUB_OFFLINE", "MINORITY_OFFLINE"))


def lpips_weights_present(net: str = "vgg") -> bool:
    """Whether torchvision's ImageNet weights of the LPIPS trunk ``net`` (vgg | alex) are in the torch hub cache."""
    return (Path(torch.hub.get_dir()) / "checkpoints" / TRUNK_FILES[net]).is_file()


def _as_rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _lpips(net_name: str, pretrained: bool, seed: int, device) -> Distance:
    """LPIPS on images in [-1, 1] (grey repeated to RGB). ``pretrained``: torchvision's ImageNet trunk with the
    learned LPIPS heads that ship inside the lpips package (the paper's d); otherwise a trunk with seeded random
    weights and uniform channel weights (``lpips=False``: unit-normalised features, squared differences summed
    over channels, averaged over positions, summed over layers), so d >= 0, d(x, x) = 0 and d is symmetric."""
    import warnings

    import lpips

    flag = {"vgg": "lpips", "alex": "lpips-alex"}[net_name] if pretrained else "lpips-rand"
    fallbacks = "choose --distance unet-feat, lpips-rand, ssim or l2"
    if pretrained and not lpips_weights_present(net_name) and _offline():
        raise OfflineError(
            f"--distance {flag} needs torchvision's pretrained {net_name.upper()} weights ({TRUNK_FILES[net_name]} in "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'}), which are absent and cannot be downloaded offline; {fallbacks}")
    try:
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")
            torch.manual_seed(seed)  # the random trunk of lpips-rand is a function of the seed
            if pretrained:
                net = lpips.LPIPS(net=net_name, pretrained=True, verbose=False)
            else:  # no learned heads: with lpips=True and pretrained=False they would be random, signed weights
                net = lpips.LPIPS(net=net_name, lpips=False, pnet_rand=True, verbose=False)
    except Exception as e:  # noqa: BLE001 - a failed download surfaces as many exception types
        raise OfflineError(f"--distance {flag}: cannot load the pretrained {net_name.upper()} trunk "
                           f"({type(e).__name__}: {e}); {fallbacks}") from None
    net = net.to(device).eval().requires_grad_(False)

    def d(x0: torch.Tensor, x0_hat: torch.Tensor) -> torch.Tensor:
        return net(_as_rgb(x0), _as_rgb(x0_hat)).reshape(-1)

    return d


def _gaussian_window(size: int, sigma: float, device) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim_distance(x0: torch.Tensor, x0_hat: torch.Tensor) -> torch.Tensor:
    """1 - SSIM (Gaussian window 11, sigma 1.5, data range 1) per image; inputs (N, C, H, W) in [-1, 1] -> (N,)."""
    a, b = (x0.float() + 1) / 2, (x0_hat.float() + 1) / 2
    c = a.shape[1]
    size = min(11, a.shape[-1] - (1 - a.shape[-1] % 2), a.shape[-2] - (1 - a.shape[-2] % 2))
    w = _gaussian_window(size, 1.5, a.device).expand(c, 1, size, size)

    def blur(z):
        return F.conv2d(z, w, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return 1 - ssim.flatten(1).mean(1)


def l2_distance(x0: torch.Tensor, x0_hat: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image, (N, C, H, W) -> (N,) (Corollary 1 holds for it, per pixel)."""
    return (x0.float() - x0_hat.float()).pow(2).flatten(1).mean(1)


def l1_distance(x0: torch.Tensor, x0_hat: torch.Tensor) -> torch.Tensor:
    """Mean absolute error per image, (N, C, H, W) -> (N,)."""
    return (x0.float() - x0_hat.float()).abs().flatten(1).mean(1)


UNET_FEAT_BLOCKS = 2  # unet-feat compares the outputs of the backbone's first two down blocks
UNET_FEAT_T_FRAC = 0.2  # ... computed with the timestep embedding of t_f = T / 5


def unet_feature_distance(model, blocks: int = UNET_FEAT_BLOCKS, t_frac: float = UNET_FEAT_T_FRAC) -> Distance:
    """LPIPS-style d in the diffusion model's own encoder features (our substitute for VGG, whose weights
    cannot be had offline): activations of the first ``blocks`` down blocks of the UNet at timestep
    t_f = t_frac * T, unit-normalised over channels at each position, squared difference summed over
    channels, averaged over positions and blocks (a class-conditional model's class embedding is left
    out: features of the image alone). x0, x0_hat (N, C, H, W) in [-1, 1] -> (N,)."""
    from core.maths.eps_model import autocast_for

    net = getattr(model, "net", None)
    if net is None or not all(hasattr(net, a) for a in ("conv_in", "time_proj", "time_embedding", "down_blocks")) \
            or any(hasattr(b, "skip_conv") for b in net.down_blocks[:blocks]):
        raise ValueError("the unet-feat distance needs a diffusers UNet2DModel backbone (down blocks without skip "
                         "connections); choose l2, l1, ssim or lpips")
    t_f = min(model.schedule.T - 1, int(round(t_frac * model.schedule.T)))
    cache: list = [None]  # (weakref to x0, its version, its features): reused over the draws of one batch

    def features(x: torch.Tensor) -> list:
        tt = torch.full((x.shape[0],), t_f, dtype=torch.long, device=x.device)
        with autocast_for(x, SCORE_PRECISION):  # fp32 on every device (issue 15.7: bf16 moved the ranks)
            emb = net.time_embedding(net.time_proj(tt).to(net.dtype))
            h, out = net.conv_in(x), []
            for block in net.down_blocks[:blocks]:
                h = block(hidden_states=h, temb=emb)[0]
                f = h.float()
                out.append(f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-8))
        return out

    def d(x0: torch.Tensor, x0_hat: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # e.g. self-guidance: x0 carries a graph and is new at every call
            feats0 = features(x0)
        else:  # minority_score_batch: the same x0 for every draw; an in-place change (version) invalidates
            entry = cache[0]  # one tuple, read once: threads sharing this distance never mix x0 and features
            if entry is None or entry[0]() is not x0 or entry[1] != x0._version:
                entry = cache[0] = (weakref.ref(x0), x0._version, features(x0))
            feats0 = entry[2]
        per_block = [(a - b).pow(2).sum(1).flatten(1).mean(1) for a, b in zip(feats0, features(x0_hat))]
        return torch.stack(per_block).mean(0)

    return d


def make_distance(name: str, device: str | torch.device = "cpu", seed: int = 0, model=None) -> Distance:
    """Build d(x0, x0_hat) -> (N,); fails at once (not mid-run) when LPIPS weights cannot be had.
    ``model``: the diffusion model, needed by unet-feat (its features are the model's own)."""
    if name == "unet-feat":
        if model is None:
            raise ValueError("the unet-feat distance needs the diffusion model (make_distance(..., model=...))")
        return unet_feature_distance(model)
    if name == "lpips":
        return _lpips("vgg", True, seed, device)
    if name == "lpips-alex":  # the trunk of the official self-guided sampler
        return _lpips("alex", True, seed, device)
    if name == "lpips-rand":
        return _lpips("vgg", False, seed, device)
    if name == "ssim":
        return ssim_distance
    if name == "l2":
        return l2_distance
    if name == "l1":
        return l1_distance
    raise ValueError(f"unknown distance {name!r}; allowed: {', '.join(DISTANCES)}")


def resolve_t(t: float, T: int, flag: str = "--t") -> int:
    """A timestep given as a fraction of T in (0, 1) or as an integer in [0, T); ValueError naming ``flag``."""
    if 0 < t < 1:
        return min(T - 1, int(round(t * T)))
    if float(t).is_integer() and 0 <= t < T:
        return int(t)
    raise ValueError(f"{flag} must be a fraction in (0, 1) or an integer timestep in [0, {T}), got {t}")


def sample_noise(indices: torch.Tensor, draws: int, shape: tuple, seed: int) -> torch.Tensor:
    """Noise (draws, N, *shape) where image ``indices[n]`` always gets the same draws for a seed."""
    out = torch.empty((draws, len(indices), *shape))
    for n, i in enumerate(indices.tolist()):  # one tiny generator per image: order-free, O(N)
        g = torch.Generator().manual_seed((seed * 1_000_003 + int(i)) % (2 ** 63))
        out[:, n] = torch.randn((draws, *shape), generator=g)
    return out


@torch.no_grad()
def minority_score_batch(model, x0: torch.Tensor, indices: torch.Tensor, settings: ScoreSettings,
                         distance: Distance, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eq. 7 (Eq. 16 with ``class_labels``): x0 (N, C, H, W) in [-1, 1], indices (N,) int -> scores (N,) float32."""
    from core.maths.eps_model import predict_eps

    noise = sample_noise(indices, settings.draws, tuple(x0.shape[1:]), settings.seed).to(x0.device, x0.dtype)
    t = torch.full((x0.shape[0],), settings.t, dtype=torch.long, device=x0.device)
    total = torch.zeros(x0.shape[0], device=x0.device)
    for eps in noise:
        x_t = model.schedule.q_sample(x0, t, eps)  # Eq. 1
        eps = predict_eps(model, x_t, t, class_labels, precision=SCORE_PRECISION).eps
        x0_hat = model.schedule.tweedie_x0(x_t, t, eps, clip=settings.clip)  # Eq. 6
        total += distance(x0, x0_hat).float()
    return total / settings.draws


def minority_scores(model, images: torch.Tensor, indices: torch.Tensor, settings: ScoreSettings,
                    distance: Distance, class_ids: Optional[torch.Tensor] = None, batch_size: int = 64,
                    progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """Score uint8 images (N, C, H, W) whose dataset rows are ``indices`` (N,); returns float32 (N,)."""
    from core.maths.eps_model import to_model_range

    if not 0 <= settings.t < model.schedule.T:
        raise ValueError(f"t must be in [0, {model.schedule.T}), got {settings.t}")
    if settings.draws < 1:
        raise ValueError(f"draws must be >= 1, got {settings.draws}")
    if model.num_classes and class_ids is None:
        raise ValueError("the model is class-conditional: the data needs one sub-folder per class")
    device = model.device
    out = np.empty(len(images), dtype=np.float32)
    for start in range(0, len(images), batch_size):
        sl = slice(start, start + batch_size)
        x0 = to_model_range(images[sl]).to(device)
        cls = class_ids[sl].to(device) if (class_ids is not None and model.num_classes) else None
        out[sl] = minority_score_batch(model, x0, indices[sl], settings, distance, cls).cpu().numpy()
        if progress is not None:
            progress(min(start + batch_size, len(images)), len(images))
    return out
