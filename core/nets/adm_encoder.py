"""ADM's noise-conditioned classifiers (EncoderUNetModel with attention pooling) and the official minority
classifier (``head(trunk(x_t, t), t)``), as modules whose parameter names are ADM's own, so an ADM state
dict loads into them unchanged (issue 19). diffusers has no such model; this is the piece we write.

A classifier folder of this kind holds ``classifier.safetensors`` and ``classifier.json`` with ``adm`` (one
encoder's preset fields) or ``adm_cascade`` (the trunk's and the head's), and the thresholds; ``load_classifier``
builds it, and guidance, ``sample --classifier`` and the classifier feature space use it like our own.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from core.nets.adm import AdmPreset, check_layout, new_folder, preset, read_checkpoint
from core.nets.checkpoint import commit_folder


def _wide(dtype: torch.dtype) -> torch.dtype:
    """ADM's fp32 upcast for the normalisations and the softmax, without narrowing float64 (which the
    equivalence tests use, so that errors of 1e-6 stand out)."""
    return torch.promote_types(dtype, torch.float32)


class _GN32(nn.GroupNorm):
    """ADM's GroupNorm32: normalise in fp32 (float64 stays float64), return the input's dtype."""

    def forward(self, x):
        w = _wide(x.dtype)
        return F.group_norm(x.to(w), self.num_groups, self.weight.to(w), self.bias.to(w), self.eps).to(x.dtype)


class AdmResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int, scale_shift: bool, mode: Optional[str] = None):
        super().__init__()
        self.in_layers = nn.Sequential(_GN32(32, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, 2 * cout if scale_shift else cout))
        self.out_layers = nn.Sequential(_GN32(32, cout), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)
        self.scale_shift, self.mode = scale_shift, mode

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.mode == "down":  # resample after the norm and activation, on both paths
            h = F.avg_pool2d(self.in_layers[1](self.in_layers[0](x)), 2, 2)
            h, x = self.in_layers[2](h), F.avg_pool2d(x, 2, 2)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb).to(h.dtype)[..., None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


def qkv_attention(qkv: torch.Tensor, heads: int, legacy: bool) -> torch.Tensor:
    """(B, 3C, T) -> (B, C, T): ADM's QKVAttentionLegacy ([q_h|k_h|v_h] per head) or QKVAttention ([q|k|v])."""
    b, width, length = qkv.shape
    d = width // (3 * heads)
    if legacy:
        q, k, v = qkv.reshape(b * heads, 3 * d, length).split(d, dim=1)
    else:
        q, k, v = (z.reshape(b * heads, d, length) for z in qkv.chunk(3, dim=1))
    scale = d ** -0.25
    w = torch.einsum("bct,bcs->bts", q * scale, k * scale).to(_wide(qkv.dtype)).softmax(dim=-1).to(qkv.dtype)
    return torch.einsum("bts,bcs->bct", w, v).reshape(b, -1, length)


class AdmAttention(nn.Module):
    def __init__(self, c: int, heads: int, legacy: bool):
        super().__init__()
        self.norm = _GN32(32, c)
        self.qkv = nn.Conv1d(c, 3 * c, 1)
        self.proj_out = nn.Conv1d(c, c, 1)
        self.heads, self.legacy = heads, legacy

    def forward(self, x: torch.Tensor, emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, c, *spatial = x.shape
        flat = x.reshape(b, c, -1)
        h = self.proj_out(qkv_attention(self.qkv(self.norm(flat)), self.heads, self.legacy))
        return (flat + h).reshape(b, c, *spatial)


class AdmAttentionPool(nn.Module):
    """Attention pooling: the spatial mean is prepended as token 0, positions added, new-order attention with
    C / 64 heads, a projection; token 0 is the output (B, K)."""

    def __init__(self, side: int, c: int, out: int, head_channels: int = 64):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(c, side * side + 1) / c ** 0.5)
        self.qkv_proj = nn.Conv1d(c, 3 * c, 1)
        self.c_proj = nn.Conv1d(c, out, 1)
        self.heads = c // head_channels

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Token 0 after attention, before the output projection: (B, C), the classifier's feature space."""
        b, c = x.shape[:2]
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + self.positional_embedding[None].to(x.dtype)
        return qkv_attention(self.qkv_proj(x), self.heads, legacy=False)[:, :, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.pooled(x)[..., None])[:, :, 0]


@dataclass(frozen=True)
class AdmClassifierInfo:
    """What the sampler's checks read from a classifier's ``cfg``: K outputs, no data-class conditioning."""

    num_outputs: int
    num_classes: int = 0


class _Seq(nn.ModuleList):
    """ADM's TimestepEmbedSequential: residual blocks take the embedding, the rest take x alone."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for m in self:
            x = m(x, emb) if isinstance(m, (AdmResBlock, AdmAttention)) else m(x)
        return x


class _Down(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.op = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class AdmEncoder(nn.Module):
    """EncoderUNetModel (pool = attention) of an ADM classifier preset: ``forward(x_t, t)`` -> logits (B, K);
    ``features(x_t, t)`` -> the middle block's output (B, C, S, S), the minority head's input."""

    def __init__(self, p: AdmPreset):
        super().__init__()
        if p.kind != "classifier":
            raise ValueError(f"preset {p.name} is a {p.kind}, not a classifier")
        self.preset = p
        mc, emb = p.model_channels, 4 * p.model_channels
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        ch = int(p.channel_mult[0] * mc)
        self.input_blocks = nn.ModuleList([_Seq([nn.Conv2d(p.in_channels, ch, 3, padding=1)])])
        ds, last, legacy = 1, len(p.channel_mult) - 1, not p.new_attention_order
        for level, mult in enumerate(p.channel_mult):
            for _ in range(p.num_res_blocks):
                layers = [AdmResBlock(ch, int(mult * mc), emb, p.use_scale_shift_norm)]
                ch = int(mult * mc)
                if ds in p.attention_ds:
                    layers.append(AdmAttention(ch, p.heads(ch), legacy))
                self.input_blocks.append(_Seq(layers))
            if level != last:
                self.input_blocks.append(_Seq([AdmResBlock(ch, ch, emb, p.use_scale_shift_norm, "down")
                                               if p.resblock_updown else _Down(ch)]))
                ds *= 2
        self.middle_block = _Seq([AdmResBlock(ch, ch, emb, p.use_scale_shift_norm),
                                  AdmAttention(ch, p.heads(ch), legacy), AdmResBlock(ch, ch, emb, p.use_scale_shift_norm)])
        self.out = nn.Sequential(_GN32(32, ch), nn.SiLU(), AdmAttentionPool(p.image_size // 2 ** last, ch, p.out_channels))
        self.feature_channels = ch
        self.cfg = AdmClassifierInfo(p.out_channels)

    def embed(self, t: torch.Tensor) -> torch.Tensor:
        half = self.preset.model_channels // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        a = t.float()[:, None] * freqs[None]  # in fp32, as ADM; then the weights' dtype
        return self.time_embed(torch.cat([torch.cos(a), torch.sin(a)], dim=1).to(self.time_embed[0].weight.dtype))

    def features(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t (B, C, H, W) on the [-1, 1] data scale, t (B,) original timesteps -> middle block (B, C', S, S)."""
        emb = self.embed(t)
        h = x_t
        for block in self.input_blocks:
            h = block(h, emb)
        return self.middle_block(h, emb).to(x_t.dtype)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_labels=None) -> torch.Tensor:
        return self.out(self.features(x_t, t))

    def feature_space(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple:
        """(pooled (B, C) before the output projection, middle-block map (B, C', S, S)): what
        ``--features classifier`` reads."""
        h = self.features(x_t, t)
        return self.out[2].pooled(self.out[1](self.out[0](h))), h


class MinorityCascade(nn.Module):
    """The official LSUN minority classifier: ``head(trunk.features(x_t, t), t)``; the gradient of its
    log-softmax flows through head and trunk."""

    def __init__(self, trunk: AdmEncoder, head: AdmEncoder):
        super().__init__()
        self.trunk, self.head = trunk, head
        self.cfg = head.cfg

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_labels=None) -> torch.Tensor:
        return self.head(self.trunk.features(x_t, t), t)

    def feature_space(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple:
        """The head's pooled features and its middle-block map, on the trunk's features."""
        return self.head.feature_space(self.trunk.features(x_t, t), t)


def _preset_dict(p: AdmPreset) -> dict:
    return {f.name: (list(getattr(p, f.name)) if isinstance(getattr(p, f.name), tuple) else getattr(p, f.name))
            for f in fields(p)}


def preset_from_dict(d: dict) -> AdmPreset:
    d = dict(d)
    for k in ("channel_mult", "attention_resolutions"):
        d[k] = tuple(d[k])
    return AdmPreset(**d)


def build_adm_classifier(cfg_json: dict) -> nn.Module:
    """The module a classifier.json of kind ``adm`` / ``adm_cascade`` describes (weights not loaded)."""
    if "adm_cascade" in cfg_json:
        c = cfg_json["adm_cascade"]
        return MinorityCascade(AdmEncoder(preset_from_dict(c["trunk"])), AdmEncoder(preset_from_dict(c["head"])))
    return AdmEncoder(preset_from_dict(cfg_json["adm"]))


def import_classifier(checkpoint: str | os.PathLike, p: AdmPreset, out: str | os.PathLike,
                      minority_head: Optional[str] = None, thresholds: Optional[list] = None,
                      log=lambda msg: None, record: Optional[dict] = None) -> Path:
    """An ADM classifier (and, with ``minority_head``, the official minority head on its trunk) as a classifier
    folder; ``record`` (e.g. the parsed ``--flags``) is kept in its config as ``adm_flags``. Each file is checked
    against its preset before use; the folder is written beside ``out`` and renamed, so a failure writes
    nothing."""
    from core.nets.checkpoint import SCHEMA_VERSION, save_weights_and_config

    if p.kind != "classifier":
        raise ValueError(f"--preset {p.name} is a {p.kind}: use import-adm")
    out = new_folder(out)
    if p.name == "mc-lsun-head":
        raise ValueError("mc-lsun-head is a minority head without its trunk: pass the 256x256 classifier as "
                         "--checkpoint with --preset gd-256-classifier and the head as --minority-head")
    hp = preset("mc-lsun-head") if minority_head is not None else None
    if hp is not None and (p.name != "gd-256-classifier" or int(p.channel_mult[-1] * p.model_channels) != hp.in_channels
                           or p.image_size // 2 ** (len(p.channel_mult) - 1) != hp.image_size):
        raise ValueError(f"--minority-head needs a trunk with {hp.in_channels} x {hp.image_size} x {hp.image_size} "
                         f"middle features: --preset gd-256-classifier (the official head was trained on it), "
                         f"not {p.name}")
    outputs = hp.out_channels if hp is not None else p.out_channels
    if thresholds is not None and len(thresholds) != outputs:
        raise ValueError(f"--thresholds has {len(thresholds)} values; the classifier has {outputs} outputs")
    # both files are read and checked before any network is built; each message names the option it came from
    state = read_checkpoint(checkpoint, "--checkpoint")
    hstate = read_checkpoint(minority_head, "--minority-head") if hp is not None else None
    check_layout(state, p, f"--checkpoint {checkpoint}")
    if hp is not None:
        check_layout(hstate, hp, f"--minority-head {minority_head}")
    trunk = AdmEncoder(p)
    trunk.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    if hp is not None:
        head = AdmEncoder(hp)
        head.load_state_dict({k: v.float() for k, v in hstate.items()}, strict=True)
        net: nn.Module = MinorityCascade(trunk, head)
        cfg = {"adm_cascade": {"trunk": _preset_dict(p), "head": _preset_dict(hp)}}
    else:
        net, cfg = trunk, {"adm": _preset_dict(p)}
    log(f"{checkpoint}: {p.name}" + (f" + minority head {minority_head}" if minority_head else "") +
        f", {sum(v.numel() for v in net.state_dict().values()) / 1e6:.2f}M parameters")
    config = {"schema": SCHEMA_VERSION, "kind": "classifier", **cfg, "thresholds": thresholds, "num_outputs": outputs,
              "source": str(checkpoint), "minority_head": minority_head, **({"adm_flags": record} if record else {})}
    weights = {k: v.contiguous() for k, v in net.state_dict().items()}
    return commit_folder(out, lambda tmp: save_weights_and_config(tmp, "classifier", weights, config))
