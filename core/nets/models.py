"""Backbones behind one eps-model protocol, and the noise-conditioned minority classifier.

Protocol (what samplers, the score and guidance rely on):
    ``model(x_t, t, class_labels=None) -> eps`` with x_t (N, C, H, W) float, t (N,) int64 in
    [0, T), class_labels (N,) int64 or None; ``model.schedule`` is its NoiseSchedule.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from core.nets.checkpoint import SCHEMA_VERSION, check_schema, load_weights_for, read_json, save_weights_and_config
from core.errors import CheckpointError, OfflineError
from core.maths.eps_model import PRECISIONS, ModelOutput, autocast_for, effective_precision, predict_eps  # noqa: F401
from core.maths.schedule import VARIANCE_TYPES, NoiseSchedule, make_schedule

MODEL_FILES = ("model.json", "model.safetensors")
CLASSIFIER_FILES = ("classifier.json", "classifier.safetensors")


# ----------------------------------------------------------------------------------------------
# Diffusion backbone (diffusers UNet2DModel) behind the eps-model protocol
# ----------------------------------------------------------------------------------------------
@dataclass
class UNetConfig:
    """The built-in UNet2DModel: small enough to train on a CPU at 32x32."""

    image_size: int = 32  # square side in pixels
    channels: int = 1  # 1 = grey, 3 = RGB
    block_out_channels: tuple = (32, 64, 64)  # width per resolution level
    layers_per_block: int = 1  # ResNet blocks per level
    attention: bool = True  # self-attention at the lowest resolution
    num_classes: int = 0  # > 0: class-conditional (class embedding added to the timestep embedding)

    def check_size(self) -> None:
        """ValueError unless the image side halves cleanly at every level (the skip connections need it)."""
        if not 8 <= self.image_size <= 1024:
            raise ValueError(f"--size must be in [8, 1024], got {self.image_size}")
        k = 2 ** (len(self.block_out_channels) - 1)
        if self.image_size < k or self.image_size % k:
            widths = ",".join(str(w) for w in self.block_out_channels)
            raise ValueError(f"--size {self.image_size} must be a multiple of {k} for --widths {widths} "
                             f"(the UNet halves the image {len(self.block_out_channels) - 1} times)")

    def diffusers_kwargs(self) -> dict:
        n = len(self.block_out_channels)
        down = ["DownBlock2D"] * n
        up = ["UpBlock2D"] * n
        if self.attention:
            down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
        return dict(
            sample_size=self.image_size,
            in_channels=self.channels,
            out_channels=self.channels,
            layers_per_block=self.layers_per_block,
            block_out_channels=tuple(self.block_out_channels),
            down_block_types=tuple(down),
            up_block_types=tuple(up),
            norm_num_groups=min(32, min(self.block_out_channels) // 2),
            num_class_embeds=self.num_classes or None,
        )


def build_unet(cfg: UNetConfig) -> nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(**cfg.diffusers_kwargs())


class DiffusionModel(nn.Module):
    """A diffusers UNet2DModel plus its schedule, called as ``eps = model(x_t, t, class_labels)``;
    ``model.predict`` also returns the variance output of learned-variance models (``variance_type``)."""

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, image_size: int, channels: int,
                 num_classes: int = 0, class_names: Optional[list[str]] = None, source: str = "",
                 variance_type: str = "fixed_small", timestep_scale: float = 1.0):
        super().__init__()
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"unknown variance_type {variance_type!r}; allowed: {', '.join(VARIANCE_TYPES)}")
        self.net = net
        self.schedule = schedule
        self.image_size = image_size
        self.channels = channels
        self.num_classes = num_classes
        self.class_names = class_names or []
        self.source = source
        self.variance_type = variance_type
        self.timestep_scale = timestep_scale  # improved-diffusion's rescale_timesteps: the net sees t * 1000 / T
        self.precision = "auto"  # backbone compute precision, see autocast_for

    @property
    def learned_variance(self) -> bool:
        return self.variance_type.startswith("learned")

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                precision: Optional[str] = None) -> ModelOutput:
        """x_t (N, C, H, W) in roughly [-3, 3]; t (N,) int64 in [0, T); class_labels (N,) int64 or None;
        ``precision`` overrides ``self.precision`` for this call (the minority score runs in fp32)."""
        if self.num_classes and class_labels is None:
            raise ValueError("this model is class-conditional: pass class labels (--class-label)")
        t_in = t if self.timestep_scale == 1.0 else t.float() * self.timestep_scale
        with autocast_for(x_t, precision or self.precision):
            out = self.net(x_t, t_in, class_labels=class_labels if self.num_classes else None).sample
        out = out.float()
        c = x_t.shape[1]
        if out.shape[1] == 2 * c:  # [eps, v]: v is used by learned variance types, dropped by fixed ones
            return ModelOutput(out[:, :c], out[:, c:] if self.learned_variance else None)
        return ModelOutput(out)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x_t (N, C, H, W) in roughly [-3, 3]; t (N,) int64 in [0, T); class_labels (N,) int64 or None -> eps (N, C, H, W)."""
        return self.predict(x_t, t, class_labels).eps


def schedule_config(schedule: NoiseSchedule, beta_start: float = 1e-4, beta_end: float = 0.02) -> dict:
    return {"name": schedule.name, "T": schedule.T, "beta_start": beta_start, "beta_end": beta_end}


def save_diffusion(run: str | os.PathLike, net: nn.Module, cfg: UNetConfig, sched_cfg: dict,
                   class_names: list[str], extra: dict[str, Any]) -> None:
    """Write RUN/model.safetensors (weights given, EMA by convention) and RUN/model.json."""
    save_weights_and_config(run, "model", net.state_dict(), {
        "schema": SCHEMA_VERSION, "kind": "diffusion", "unet": asdict(cfg), "schedule": sched_cfg,
        "class_names": class_names, **extra,
    })


def save_model_run(run: str | os.PathLike, model: DiffusionModel, extra: Optional[dict] = None) -> None:
    """Write any loaded DiffusionModel (ours, a diffusers folder, a hub id) as a run folder: model.json keeps the
    UNet2DModel config, the schedule and the variance type; model.safetensors the weights."""
    betas = model.schedule.betas
    sched = {"name": model.schedule.name, "T": model.schedule.T, "beta_start": float(betas[0]), "beta_end": float(betas[-1])}
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(model.net.config).items() if not k.startswith("_")}
    state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    Path(run).mkdir(parents=True, exist_ok=True)
    save_weights_and_config(run, "model", state, {
        "schema": SCHEMA_VERSION, "kind": "diffusion", "unet_diffusers": config, "image_size": model.image_size,
        "channels": model.channels, "num_classes": model.num_classes, "variance_type": model.variance_type,
        "timestep_scale": model.timestep_scale, "attention_heads": _fixed_heads(model.net),
        "time_channels": _own_time_channels(model.net),
        "schedule": sched, "class_names": model.class_names, **(extra or {})})


def _fixed_heads(net: nn.Module) -> Optional[int]:
    """The attention head count when it is fixed across widths (ADM's num_heads), which a UNet2DModel config's
    attention_head_dim cannot express; None when the config already gives every block's heads."""
    from diffusers.models.attention_processor import Attention

    cfg_dim = net.config.get("attention_head_dim")
    heads = {m.heads for m in net.modules() if isinstance(m, Attention)}
    dims = {m.to_q.out_features // m.heads for m in net.modules() if isinstance(m, Attention)}
    if len(heads) == 1 and (cfg_dim is None or dims != {cfg_dim}):
        return heads.pop()
    return None


def _own_time_channels(net: nn.Module) -> Optional[int]:
    """The timestep sinusoid width when it differs from the first block's (set_time_channels), else None."""
    if net.config.get("time_embedding_type", "positional") != "positional":
        return None  # a Fourier embedding is twice the first width by design, and its config rebuilds it
    width = getattr(getattr(net, "time_embedding", None), "linear_1", None)
    first = (net.config.get("block_out_channels") or [None])[0]
    return width.in_features if width is not None and width.in_features != first else None


def set_time_channels(net: nn.Module, channels: int) -> None:
    """Give a UNet2DModel's timestep embedding ``channels`` sinusoid channels and a ``4 * channels`` embedding
    (ADM's model_channels), where diffusers takes both from the first block's width; ADM 512x512 starts at
    half width (channel_mult 0.5), so there they differ. Every ResNet's time projection is rebuilt to match."""
    from diffusers.models.embeddings import TimestepEmbedding, Timesteps

    emb = 4 * channels
    net.time_proj = Timesteps(channels, net.config.flip_sin_to_cos, net.config.freq_shift)
    net.time_embedding = TimestepEmbedding(channels, emb)
    if getattr(net, "class_embedding", None) is not None:
        net.class_embedding = nn.Embedding(net.class_embedding.num_embeddings, emb)
    for m in net.modules():
        if isinstance(getattr(m, "time_emb_proj", None), nn.Linear):
            m.time_emb_proj = nn.Linear(emb, m.time_emb_proj.out_features)


def set_attention_heads(net: nn.Module, heads: int) -> None:
    """Give every attention block of a UNet2DModel ``heads`` heads (and the matching 1/sqrt(d) scale)."""
    from diffusers.models.attention_processor import Attention

    for mod in net.modules():
        if isinstance(mod, Attention):
            mod.heads = heads
            mod.scale = (mod.to_q.out_features // heads) ** -0.5


def load_diffusion(spec: str | os.PathLike, device: str | torch.device = "cpu") -> DiffusionModel:
    """Load a run folder of ours, a diffusers UNet2DModel folder, or a hub id (needs internet)."""
    path = Path(spec)
    if (path / "model.json").is_file():
        return _load_own(path, device)
    if path.is_dir():
        return _load_diffusers(str(path), device, local=True)
    if path.exists():
        raise CheckpointError(f"--model {spec}: expected a run folder (model.json) or a diffusers UNet2DModel folder")
    if str(spec).count("/") == 1 and not str(spec).startswith((".", "/")):
        return _load_diffusers(str(spec), device, local=False)
    raise CheckpointError(f"--model {spec}: no such folder")


def _load_own(path: Path, device) -> DiffusionModel:
    cfg_json = read_json(path / "model.json")
    check_schema(cfg_json, str(path / "model.json"), "diffusion")
    if "unet_diffusers" in cfg_json:  # written by save_model_run from any UNet2DModel
        return _load_saved_diffusers(path, cfg_json, device)
    try:
        u = dict(cfg_json["unet"])
        u["block_out_channels"] = tuple(u["block_out_channels"])
        cfg = UNetConfig(**u)
        s = cfg_json["schedule"]
        schedule = make_schedule(s["name"], int(s["T"]), float(s["beta_start"]), float(s["beta_end"]))
        net = build_unet(cfg)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, RuntimeError) as e:
        raise CheckpointError(f"{path / 'model.json'}: malformed config ({type(e).__name__}: {e})") from None
    net = load_weights_for(net, path, "model", cfg_json)
    model = DiffusionModel(net, schedule, cfg.image_size, cfg.channels, cfg.num_classes,
                           list(cfg_json.get("class_names") or []), source=str(path))
    return model.to(device).eval().requires_grad_(False)


def _load_saved_diffusers(path: Path, cfg_json: dict, device) -> DiffusionModel:
    from diffusers import UNet2DModel

    try:
        net = UNet2DModel.from_config(dict(cfg_json["unet_diffusers"]))
        s = cfg_json["schedule"]
        schedule = make_schedule(s["name"], int(s["T"]), float(s["beta_start"]), float(s["beta_end"]))
        size, channels = int(cfg_json["image_size"]), int(cfg_json["channels"])
        variance_type = cfg_json.get("variance_type", "fixed_small")
        scale = float(cfg_json.get("timestep_scale", 1.0))
        if cfg_json.get("attention_heads"):
            set_attention_heads(net, int(cfg_json["attention_heads"]))
        if cfg_json.get("time_channels"):
            set_time_channels(net, int(cfg_json["time_channels"]))
    except (KeyError, TypeError, ValueError, ZeroDivisionError, RuntimeError) as e:
        raise CheckpointError(f"{path / 'model.json'}: malformed config ({type(e).__name__}: {e})") from None
    net = load_weights_for(net, path, "model", cfg_json)
    model = DiffusionModel(net, schedule, size, channels, int(cfg_json.get("num_classes") or 0),
                           list(cfg_json.get("class_names") or []), source=str(path), variance_type=variance_type,
                           timestep_scale=scale)
    return model.to(device).eval().requires_grad_(False)


def _load_diffusers(spec: str, device, local: bool) -> DiffusionModel:
    """A diffusers UNet2DModel (root or ``unet/`` subfolder) with its DDPM scheduler config; safetensors only."""
    from diffusers import UNet2DModel

    if not local and os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise OfflineError(f"--model {spec}: a hub id needs a download, but HF_HUB_OFFLINE is set; "
                           "pass a local folder (a run of train-diffusion or a downloaded diffusers UNet2DModel)")
    sub = None
    if local and not (Path(spec) / "config.json").is_file() and (Path(spec) / "unet" / "config.json").is_file():
        sub = "unet"
    try:
        net = UNet2DModel.from_pretrained(spec, subfolder=sub, use_safetensors=True)
        sched = _diffusers_scheduler_config(spec, local)
    except OfflineError:
        raise
    except (OSError, ValueError, EnvironmentError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "" if local else " (a hub id needs internet access)"
        raise CheckpointError(f"--model {spec}: cannot load a diffusers UNet2DModel with safetensors weights{hint}: {first}") from None
    name = {"linear": "linear", "squaredcos_cap_v2": "cosine"}.get(sched.get("beta_schedule", "linear"))
    if name is None:
        raise CheckpointError(f"--model {spec}: beta_schedule {sched.get('beta_schedule')!r} is not supported; allowed: linear, squaredcos_cap_v2")
    if sched.get("prediction_type", "epsilon") != "epsilon":
        raise CheckpointError(f"--model {spec}: prediction_type {sched.get('prediction_type')!r} is not supported; allowed: epsilon")
    schedule = make_schedule(name, int(sched.get("num_train_timesteps", 1000)),
                             float(sched.get("beta_start", 1e-4)), float(sched.get("beta_end", 0.02)))
    c = net.config
    size = c.sample_size if isinstance(c.sample_size, int) else int(c.sample_size[0])
    variance_type = variance_type_for(sched, c.in_channels, c.out_channels, spec)
    model = DiffusionModel(net, schedule, size, c.in_channels, int(c.num_class_embeds or 0), source=spec,
                           variance_type=variance_type)
    return model.to(device).eval().requires_grad_(False)


def variance_type_for(sched: dict, in_channels: int, out_channels: int, spec: str) -> str:
    """The sampler's variance from a scheduler config's ``variance_type``. Without one, a 2C-channel output is
    ADM's learned range (``learn_sigma``; diffusers' own default, fixed_small, has no use for a second half)."""
    if "variance_type" not in sched:
        return "learned_range" if out_channels == 2 * in_channels else "fixed_small"
    vt = sched["variance_type"]
    if vt not in VARIANCE_TYPES:
        raise CheckpointError(f"--model {spec}: variance_type {vt!r} is not supported; allowed: {', '.join(VARIANCE_TYPES)}")
    if vt.startswith("learned") and out_channels != 2 * in_channels:
        raise CheckpointError(f"--model {spec}: variance_type {vt!r} needs {2 * in_channels} output channels "
                              f"([eps, v]), the UNet has {out_channels}")
    return vt


def _diffusers_scheduler_config(spec: str, local: bool) -> dict:
    if local:
        for cand in ("scheduler_config.json", "scheduler/scheduler_config.json"):
            p = Path(spec) / cand
            if p.is_file():
                return read_json(p)
        return {}  # diffusers DDPM defaults: linear 1e-4..0.02 over 1000 steps
    from huggingface_hub import hf_hub_download

    for sub in (None, "scheduler"):
        try:
            return read_json(hf_hub_download(spec, "scheduler_config.json", subfolder=sub))
        except Exception:  # noqa: BLE001 - try the next layout
            continue
    return {}


# ----------------------------------------------------------------------------------------------
# Noise-conditioned classifier p_psi(l | x_t, t[, c]): a small U-Net encoder with attention pooling
# ----------------------------------------------------------------------------------------------
@dataclass
class ClassifierConfig:
    """An ADM-style EncoderUNet, sized for CPU guidance: see benchmarks/bench_guidance.py."""

    image_size: int = 32  # input side in pixels
    channels: int = 1  # input channels
    num_outputs: int = 50  # L, the number of ordinal minority classes
    base_channels: int = 16  # width of the first level (16: guidance cost vs backbone, README)
    channel_mult: tuple = (1, 2, 2)  # width multiplier per level; each level after the first halves H, W
    num_res_blocks: int = 1  # residual blocks per level
    num_heads: int = 4  # attention-pooling heads
    num_classes: int = 0  # > 0: also conditioned on a data class c (Appendix B.3, Eq. 17)
    T: int = 1000  # training timesteps of the diffusion schedule
    dropout: float = 0.0


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _groups(ch: int) -> int:
    return math.gcd(ch, 16)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(_groups(cin), cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        self.out_layers = nn.Sequential(nn.GroupNorm(_groups(cout), cout), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class AttentionPool2d(nn.Module):
    """CLIP/ADM attention pooling: the mean token attends over all positions, then a projection."""

    def __init__(self, side: int, ch: int, heads: int, out_dim: int):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(ch, side * side + 1) / ch ** 0.5)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj = nn.Conv1d(ch, out_dim, 1)
        self.heads = heads

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        x = x.reshape(n, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + self.pos[None].to(x.dtype)
        q, k, v = self.qkv(x).reshape(n, 3, self.heads, c // self.heads, -1).transpose(-1, -2).unbind(1)
        a = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # (n, heads, 1, c/heads)
        return a.transpose(-1, -2).reshape(n, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pooled(x))[:, :, 0]


class NoiseConditionedClassifier(nn.Module):
    """p_psi(l | x_t, t[, c]): logits (N, L) for x_t (N, C, H, W), t (N,) int64 in [0, T), c (N,) int64 or None."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        base = cfg.base_channels
        emb_dim = 4 * base
        self.time_embed = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(cfg.num_classes, emb_dim) if cfg.num_classes else None
        self.inp = nn.Conv2d(cfg.channels, base, 3, padding=1)
        blocks, downs = nn.ModuleList(), nn.ModuleList()
        ch, side = base, cfg.image_size
        for level, mult in enumerate(cfg.channel_mult):
            level_blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level_blocks.append(ResBlock(ch, base * mult, emb_dim, cfg.dropout))
                ch = base * mult
            blocks.append(level_blocks)
            last = level == len(cfg.channel_mult) - 1
            downs.append(nn.Identity() if last else nn.Conv2d(ch, ch, 3, stride=2, padding=1))
            if not last:
                side = (side + 1) // 2
        self.blocks, self.downs = blocks, downs
        self.middle = ResBlock(ch, ch, emb_dim, cfg.dropout)
        self.out_norm = nn.Sequential(nn.GroupNorm(_groups(ch), ch), nn.SiLU())
        heads = cfg.num_heads if ch % cfg.num_heads == 0 else 1
        self.pool = AttentionPool2d(side, ch, heads, cfg.num_outputs)
        self.feature_dim = ch
        self.precision = "auto"  # compute precision, see autocast_for (``sample --precision`` sets it)

    def _trunk(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor]) -> torch.Tensor:
        if self.class_embed is not None and class_labels is None:
            raise ValueError("this classifier is class-conditional: pass class labels")
        emb = self.time_embed(timestep_embedding(t, self.cfg.base_channels))
        if self.class_embed is not None:
            emb = emb + self.class_embed(class_labels)
        h = self.inp(x_t)
        for level_blocks, down in zip(self.blocks, self.downs):
            for blk in level_blocks:
                h = blk(h, emb)
            h = down(h)
        return self.out_norm(self.middle(h, emb))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        with autocast_for(x_t, self.precision):
            logits = self.pool(self._trunk(x_t, t, class_labels))
        return logits.float()

    def features(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention-pooled features (N, feature_dim), e.g. for density metrics in the classifier's space."""
        return self.pool.pooled(self._trunk(x_t, t, class_labels))[:, :, 0].float()


@dataclass
class LoadedClassifier:
    """A trained classifier with what it was trained on: L thresholds (global or per class)."""

    net: NoiseConditionedClassifier
    thresholds: Any  # list[float] (global) or dict[str, list[float]] (per data class)
    info: dict = field(default_factory=dict)


def save_classifier(out: str | os.PathLike, net: NoiseConditionedClassifier, thresholds: Any, extra: dict) -> None:
    save_weights_and_config(out, "classifier", net.state_dict(), {
        "schema": SCHEMA_VERSION, "kind": "classifier", "config": asdict(net.cfg), "thresholds": thresholds, **extra,
    })


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedClassifier:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"--classifier {path}: no such folder")
    cfg_json = read_json(path / "classifier.json")
    check_schema(cfg_json, str(path / "classifier.json"), "classifier")
    if "adm" in cfg_json or "adm_cascade" in cfg_json:  # an imported ADM classifier (core/nets/adm_encoder.py)
        from core.nets.adm_encoder import build_adm_classifier

        try:
            net = build_adm_classifier(cfg_json)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path / 'classifier.json'}: malformed ADM config ({type(e).__name__}: {e})") from None
        net = load_weights_for(net, path, "classifier", cfg_json)
        info = {k: v for k, v in cfg_json.items() if k not in ("adm", "adm_cascade", "thresholds")}
        return LoadedClassifier(net.to(device).eval().requires_grad_(False), cfg_json.get("thresholds"), info)
    try:
        c = dict(cfg_json["config"])
        c["channel_mult"] = tuple(c["channel_mult"])
        cfg = ClassifierConfig(**c)
        net = NoiseConditionedClassifier(cfg)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, RuntimeError) as e:
        raise CheckpointError(f"{path / 'classifier.json'}: malformed config ({type(e).__name__}: {e})") from None
    net = load_weights_for(net, path, "classifier", cfg_json)
    info = {k: v for k, v in cfg_json.items() if k not in ("config", "thresholds")}
    return LoadedClassifier(net.to(device).eval().requires_grad_(False), cfg_json.get("thresholds"), info)
