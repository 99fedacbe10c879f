"""Minority score (Eq. 7; class-conditional Eq. 16) and the distances d(x0, x0_hat) it can use.

``l(x0) = E_eps[ d(x0, x0_hat(x_t)) ]`` with x_t = q_sample(x0, t, eps) and x0_hat by Tweedie.
Noise for image i comes from its own generator seeded from (seed, i), so scores do not depend on
batch size, order or how many processes share the work.

Every distance here is a ``SpatialDistance``: a weighted sum over layers of per-position values averaged over
positions. ``rarity_map`` keeps the positions: the score decomposed over the image (issue 27; the paper's
Figure 1: where x0_hat replaced the image with common features), from the same draw loop as the score.
"""
from __future__ import annotations

import os
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from core.errors import OfflineError

DISTANCES = ("lpips", "lpips-alex", "lpips-rand", "unet-feat", "ssim", "l2", "l1")
Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Layers = list  # [(weight, values (N, h, w) float32)]: a distance's per-position values, one entry per layer
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


def _area_matrix(n_out: int, n_in: int) -> torch.Tensor:
    """(n_out, n_in) float64: entry (i, k) = the share of output pixel [i, i+1) covered by input cell k when the
    n_in cells tile [0, n_out) evenly. Rows sum to 1 and every column to n_out / n_in, so the mean is kept; for
    an integer factor the entries are exactly 0 or 1 (nearest-neighbour replication). Integer arithmetic in
    units of 1 / n_in: exact."""
    i = torch.arange(n_out, dtype=torch.int64)[:, None] * n_in  # output pixel i spans [i n_in, (i+1) n_in)
    k = torch.arange(n_in, dtype=torch.int64)[None, :] * n_out  # input cell k spans [k n_out, (k+1) n_out)
    overlap = (torch.minimum(i + n_in, k + n_out) - torch.maximum(i, k)).clamp_min(0)
    return overlap.double() / n_in


def area_resize(values: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Mean-preserving resize of per-position values (N, h, w) to (N, H, W) = ``size``: each of the h x w cells
    covers an (H/h) x (W/w) block of the image and every pixel takes the area-weighted mean of the cells under
    it (nearest replication for integer factors). ``out.mean((1, 2)) == values.mean((1, 2))`` up to rounding."""
    h, w = values.shape[-2:]
    if (h, w) == tuple(size):
        return values
    a_h, a_w = (_area_matrix(n, m).to(values.device) for n, m in ((size[0], h), (size[1], w)))
    return (a_h @ values.double() @ a_w.T).to(values.dtype)


class SpatialDistance:
    """A distance d(x0, x0_hat) -> (N,) of the form sum_l w_l * mean_positions(v_l), where ``layers`` gives each
    layer's weight w_l and per-position values v_l (N, h_l, w_l) >= 0; called like any Distance. ``map`` keeps
    the positions: sum_l w_l * spread(v_l) at image size (N, H, W), whose mean over pixels is d. ``spread``
    brings one layer to the image, keeping its mean: ``area_resize`` unless the distance says otherwise."""

    def __init__(self, name: str, layers: Callable[[torch.Tensor, torch.Tensor], Layers],
                 spread: Callable[[torch.Tensor, Sequence[int]], torch.Tensor] = area_resize):
        self.name, self.layers, self.spread = name, layers, spread

    def __repr__(self) -> str:
        return f"SpatialDistance({self.name!r})"

    @staticmethod
    def reduce(layers: Layers) -> torch.Tensor:
        """The distance from its layers: sum_l w_l * (mean of v_l over positions) -> (N,) float32."""
        total = 0
        for w, v in layers:
            total = total + w * v.flatten(1).mean(1)
        return total

    def to_image(self, layers: Layers, size: Sequence[int]) -> torch.Tensor:
        """The map of ``layers`` at image size (H, W): sum_l w_l * spread(v_l) -> (N, H, W) float32; its mean
        over pixels is ``reduce(layers)``."""
        total = 0
        for w, v in layers:
            total = total + w * self.spread(v, size)
        return total

    def __call__(self, x0: torch.Tensor, x0_hat: torch.Tensor) -> torch.Tensor:
        """d(x0, x0_hat): (N, C, H, W) x2 in [-1, 1] -> (N,) float32 >= 0."""
        return self.reduce(self.layers(x0, x0_hat))

    def map(self, x0: torch.Tensor, x0_hat: torch.Tensor) -> torch.Tensor:
        """The spatial form of d: (N, C, H, W) x2 -> (N, H, W) float32, ``map.mean((1, 2)) == d(x0, x0_hat)``."""
        return self.to_image(self.layers(x0, x0_hat), x0.shape[-2:])


def _lpips(net_name: str, pretrained: bool, seed: int, device) -> SpatialDistance:
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
    return _lpips_distance(net.to(device).eval().requires_grad_(False), flag)


def _lpips_distance(net, name: str) -> SpatialDistance:
    """An ``lpips.LPIPS`` network as a SpatialDistance, computed from its parts the way its forward does
    (same numbers as ``net(x0, x0_hat, retPerLayer=True)``): for each trunk layer k, at each of its positions,
    the squared difference of the channel-normalised features, weighted by the learned 1x1 head lin_k (lpips,
    lpips-alex: ``net.lpips``) or summed over channels (uniform weights: lpips-rand); layers weighted 1 (LPIPS
    sums the layers' spatial means). The package's own ``spatial=True`` path upsamples bilinearly, which keeps
    the mean only for integer factors; here each layer goes to the image by ``area_resize``."""
    import lpips

    def layers(x0: torch.Tensor, x0_hat: torch.Tensor) -> Layers:
        a, b = _as_rgb(x0), _as_rgb(x0_hat)
        if net.version == "0.1":
            a, b = net.scaling_layer(a), net.scaling_layer(b)
        out = []
        for k, (f0, f1) in enumerate(zip(net.net.forward(a), net.net.forward(b))):
            diff = (lpips.normalize_tensor(f0) - lpips.normalize_tensor(f1)) ** 2  # (N, C_k, h_k, w_k)
            per_position = net.lins[k](diff) if net.lpips else diff.sum(dim=1, keepdim=True)  # (N, 1, h_k, w_k)
            out.append((1.0, per_position[:, 0].float()))
        return out

    return SpatialDistance(name, layers)


def _gaussian_window(size: int, sigma: float, device) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def _ssim_window_size(h: int, w: int) -> int:
    return min(11, w - (1 - w % 2), h - (1 - h % 2))  # 11, or the largest odd size that fits


def _ssim_layers(x0: torch.Tensor, x0_hat: torch.Tensor) -> Layers:
    """1 - SSIM (Gaussian window 11, sigma 1.5, data range 1) at each window position of the valid region,
    averaged over channels: inputs (N, C, H, W) in [-1, 1] -> one layer (N, H - s + 1, W - s + 1) in [0, 2]."""
    a, b = (x0.float() + 1) / 2, (x0_hat.float() + 1) / 2
    c = a.shape[1]
    size = _ssim_window_size(a.shape[-2], a.shape[-1])
    w = _gaussian_window(size, 1.5, a.device).expand(c, 1, size, size)

    def blur(z):
        return F.conv2d(z, w, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return [(1.0, (1 - ssim).mean(1))]


def _ssim_spread(values: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """1 - SSIM of each window (N, h, w) spread over the pixels of its window with the window's Gaussian weights
    (the adjoint of the windowing: a transposed convolution, so each window sits where it looked), times
    H W / (h w) so that the mean over (N, H, W) is the mean over the windows. Pixels near the border lie in few
    windows and get little (nothing is lost: the mass stays on the pixels the windows saw)."""
    h, w = values.shape[-2:]
    s = _ssim_window_size(*size)
    window = _gaussian_window(s, 1.5, values.device)  # sums to 1
    return F.conv_transpose2d(values[:, None], window)[:, 0] * (size[0] * size[1] / (h * w))


# 1 - SSIM per image: (N, C, H, W) x2 in [-1, 1] -> (N,) in [0, 2]; map: see _ssim_spread
ssim_distance = SpatialDistance("ssim", _ssim_layers, spread=_ssim_spread)


def _l2_layers(x0: torch.Tensor, x0_hat: torch.Tensor) -> Layers:
    """Squared error per pixel, mean over channels: (N, C, H, W) x2 -> one layer (N, H, W) in [0, 4]."""
    return [(1.0, (x0.float() - x0_hat.float()).pow(2).mean(1))]


def _l1_layers(x0: torch.Tensor, x0_hat: torch.Tensor) -> Layers:
    """Absolute error per pixel, mean over channels: (N, C, H, W) x2 -> one layer (N, H, W) in [0, 2]."""
    return [(1.0, (x0.float() - x0_hat.float()).abs().mean(1))]


# mean squared error per image, (N, C, H, W) -> (N,) (Corollary 1 holds for it, per pixel); map: per pixel
l2_distance = SpatialDistance("l2", _l2_layers)
# mean absolute error per image, (N, C, H, W) -> (N,); map: per pixel
l1_distance = SpatialDistance("l1", _l1_layers)


UNET_FEAT_BLOCKS = 2  # unet-feat compares the outputs of the backbone's first two down blocks
UNET_FEAT_T_FRAC = 0.2  # ... computed with the timestep embedding of t_f = T / 5


def unet_feature_distance(model, blocks: int = UNET_FEAT_BLOCKS, t_frac: float = UNET_FEAT_T_FRAC) -> SpatialDistance:
    """LPIPS-style d in the diffusion model's own encoder features (our substitute for VGG, whose weights
    cannot be had offline): activations of the first ``blocks`` down blocks of the UNet at timestep
    t_f = t_frac * T, unit-normalised over channels at each position, squared difference summed over
    channels, averaged over positions and blocks (a class-conditional model's class embedding is left
    out: features of the image alone). x0, x0_hat (N, C, H, W) in [-1, 1] -> (N,). Map: each block's
    per-position values brought to the image by ``area_resize``, weighted 1 / blocks."""
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

    def layers(x0: torch.Tensor, x0_hat: torch.Tensor) -> Layers:
        if torch.is_grad_enabled():  # e.g. self-guidance: x0 carries a graph and is new at every call
            feats0 = features(x0)
        else:  # minority_score_batch: the same x0 for every draw; an in-place change (version) invalidates
            entry = cache[0]  # one tuple, read once: threads sharing this distance never mix x0 and features
            if entry is None or entry[0]() is not x0 or entry[1] != x0._version:
                entry = cache[0] = (weakref.ref(x0), x0._version, features(x0))
            feats0 = entry[2]
        return [(1 / len(feats0), (a - b).pow(2).sum(1)) for a, b in zip(feats0, features(x0_hat))]

    return SpatialDistance("unet-feat", layers)


def make_distance(name: str, device: str | torch.device = "cpu", seed: int = 0, model=None) -> SpatialDistance:
    """Build d(x0, x0_hat) -> (N,) with its spatial form (``.map``); fails at once (not mid-run) when LPIPS
    weights cannot be had.
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


def _check_settings(model, settings: ScoreSettings) -> None:
    if not 0 <= settings.t < model.schedule.T:
        raise ValueError(f"t must be in [0, {model.schedule.T}), got {settings.t}")
    if settings.draws < 1:
        raise ValueError(f"draws must be >= 1, got {settings.draws}")


@torch.no_grad()
def _eq7_draws(model, x0: torch.Tensor, indices: torch.Tensor, settings: ScoreSettings,
               class_labels: Optional[torch.Tensor],
               per_draw: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The draw loop of Eq. 7, shared by the score and its map: for each of ``settings.draws`` noise draws, x_t
    at ``settings.t`` and its Tweedie x0_hat (N, C, H, W), handed to ``per_draw(x_t, x0_hat) -> d (N,)``;
    returns the mean of d over the draws (N,) float32."""
    from core.maths.eps_model import predict_eps

    noise = sample_noise(indices, settings.draws, tuple(x0.shape[1:]), settings.seed).to(x0.device, x0.dtype)
    t = torch.full((x0.shape[0],), settings.t, dtype=torch.long, device=x0.device)
    total = torch.zeros(x0.shape[0], device=x0.device)
    for eps in noise:
        x_t = model.schedule.q_sample(x0, t, eps)  # Eq. 1
        eps = predict_eps(model, x_t, t, class_labels, precision=SCORE_PRECISION).eps
        x0_hat = model.schedule.tweedie_x0(x_t, t, eps, clip=settings.clip)  # Eq. 6
        total += per_draw(x_t, x0_hat).float()
    return total / settings.draws  # Eq. 7: the expectation over eps, by its sample mean


def minority_score_batch(model, x0: torch.Tensor, indices: torch.Tensor, settings: ScoreSettings,
                         distance: Distance, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eq. 7 (Eq. 16 with ``class_labels``): x0 (N, C, H, W) in [-1, 1], indices (N,) int -> scores (N,) float32."""
    return _eq7_draws(model, x0, indices, settings, class_labels, lambda x_t, x0_hat: distance(x0, x0_hat))


@dataclass(frozen=True)
class RarityMap:
    """The minority score of N images decomposed over their pixels (``rarity_map``).

    map: (N, H, W) float32 >= 0, the distance's per-position values at image size averaged over the draws;
        ``map.mean((1, 2)) == score`` (float32 rounding: relative error ~1e-7).
    score: (N,) float32, Eq. 7, the very numbers ``minority_score_batch`` gives.
    x_t: (N, C, H, W) the first draw's noised image at ``settings.t`` (Eq. 1), for display.
    x0_hat: (N, C, H, W) its Tweedie reconstruction (Eq. 6; in [-1, 1] when ``settings.clip``), for display.
    """

    map: torch.Tensor
    score: torch.Tensor
    x_t: torch.Tensor
    x0_hat: torch.Tensor
    settings: ScoreSettings

    def mass_share(self, mask: torch.Tensor) -> torch.Tensor:
        """The share of each map's mass inside ``mask`` (H, W) or (N, H, W) bool -> (N,) in [0, 1]."""
        m = self.map.double()
        return ((m * mask.to(m.device, torch.bool)).flatten(1).sum(1) / m.flatten(1).sum(1)).float()


def rarity_map(model, x0: torch.Tensor, indices: torch.Tensor, settings: ScoreSettings,
               distance: Optional[SpatialDistance] = None, class_labels: Optional[torch.Tensor] = None) -> RarityMap:
    """Where each image's minority score comes from: Eq. 7 with the same draws (``sample_noise`` of
    ``indices``), timestep, clipping and distance as ``minority_score_batch``, keeping the distance's positions:
    map = E_eps[ spatial d(x0, x0_hat) ] at image size, whose mean over pixels is the score. Per distance:
    l2 / l1 per pixel (mean over channels); ssim each window's 1 - SSIM spread over its window; lpips* and
    unet-feat each feature layer's per-position values area-resized to the image (see ``SpatialDistance``).

    x0: (N, C, H, W) float in [-1, 1] on the model's device; indices: (N,) int, the images' dataset rows (their
    noise); ``distance``: from ``make_distance(settings.distance, ...)``, built here when None; class_labels:
    (N,) int for a class-conditional model (Eq. 16). Bad input raises a one-line ValueError."""
    indices = torch.as_tensor(indices)
    if x0.dim() != 4 or not x0.is_floating_point() or len(x0) == 0:
        raise ValueError(f"x0 must be a float tensor (N, C, H, W) in [-1, 1] with N >= 1, got {x0.dtype} "
                         f"{tuple(x0.shape)}")
    channels, size = getattr(model, "channels", None), getattr(model, "image_size", None)
    if channels is not None and x0.shape[1] != channels:
        raise ValueError(f"x0 {tuple(x0.shape)} does not fit the model's channels {channels}")
    if size is not None and tuple(x0.shape[-2:]) != (size, size):
        raise ValueError(f"x0 {tuple(x0.shape)} does not fit the model's image_size {size}")
    lo, hi = float(x0.min()), float(x0.max())
    if lo < -1 - 1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"x0 must be in [-1, 1] (to_model_range of uint8 images), got values in [{lo:.3g}, {hi:.3g}]")
    if indices.shape != (len(x0),) or indices.is_floating_point():
        raise ValueError(f"indices must be (N,) = ({len(x0)},) integers, got {indices.dtype} {tuple(indices.shape)}")
    if getattr(model, "num_classes", 0) and (class_labels is None or tuple(class_labels.shape) != (len(x0),)):
        raise ValueError(f"the model is class-conditional: pass class_labels ({len(x0)},)")
    _check_settings(model, settings)
    if distance is None:
        distance = make_distance(settings.distance, x0.device, seed=settings.seed, model=model)
    if not isinstance(distance, SpatialDistance):
        raise ValueError(f"the distance {distance!r} has no spatial form; use make_distance({settings.distance!r})")
    if distance.name != settings.distance:
        raise ValueError(f"the distance is {distance.name!r} but settings.distance is {settings.distance!r}")

    acc: dict = {}

    def per_draw(x_t: torch.Tensor, x0_hat: torch.Tensor) -> torch.Tensor:
        layers = distance.layers(x0, x0_hat)  # one computation for the score and the map
        m = distance.to_image(layers, x0.shape[-2:]).double()
        acc["map"] = acc["map"] + m if "map" in acc else m
        acc.setdefault("first", (x_t, x0_hat))
        return distance.reduce(layers)  # = distance(x0, x0_hat), what minority_score_batch averages

    score = _eq7_draws(model, x0, indices, settings, class_labels, per_draw)
    x_t, x0_hat = acc["first"]
    return RarityMap((acc["map"] / settings.draws).float(), score, x_t, x0_hat, settings)  # Eq. 7, per position


def minority_scores(model, images: torch.Tensor, indices: torch.Tensor, settings: ScoreSettings,
                    distance: Distance, class_ids: Optional[torch.Tensor] = None, batch_size: int = 64,
                    progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """Score uint8 images (N, C, H, W) whose dataset rows are ``indices`` (N,); returns float32 (N,)."""
    from core.maths.eps_model import to_model_range

    _check_settings(model, settings)
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
