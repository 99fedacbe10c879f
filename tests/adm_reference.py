"""A plain-functional ADM forward written from ../shared/ADM.md's description, for the importer's equivalence
tests only. It reads the ADM state dict directly (no conversion), so it checks convert_unet and the
diffusers structure independently. Kept small: no dropout, no fp16. It runs in the dtype of its inputs and
weights (the tests use float64, so that an error of 1e-6 in a normalisation stands out); GroupNorm and the
softmax run in at least fp32 as in ADM, and the sinusoidal timestep embedding is computed in fp32 as ADM
does ("t is cast to float") and then cast to the weights' dtype."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _wide(dtype):
    """ADM's fp32 upcast, without narrowing float64."""
    return torch.promote_types(dtype, torch.float32)


def _gn(x, s, key):
    w = _wide(x.dtype)
    return F.group_norm(x.to(w), 32, s[f"{key}.weight"].to(w), s[f"{key}.bias"].to(w), eps=1e-5).to(x.dtype)


def _conv(x, s, key, stride=1):
    return F.conv2d(x, s[f"{key}.weight"], s[f"{key}.bias"], stride=stride, padding=1)


def _resblock(x, emb, s, key, scale_shift, mode=None):
    """ADM ResBlock; mode None, 'up' (nearest x2) or 'down' (avg pool 2x2) on both paths."""
    h = F.silu(_gn(x, s, f"{key}.in_layers.0"))
    if mode is not None:
        resample = (lambda z: F.interpolate(z, scale_factor=2, mode="nearest")) if mode == "up" else \
            (lambda z: F.avg_pool2d(z, 2, 2))
        h, x = resample(h), resample(x)
    h = _conv(h, s, f"{key}.in_layers.2")
    e = F.linear(F.silu(emb), s[f"{key}.emb_layers.1.weight"], s[f"{key}.emb_layers.1.bias"])[..., None, None]
    if scale_shift:
        scale, shift = e.chunk(2, dim=1)
        h = _gn(h, s, f"{key}.out_layers.0") * (1 + scale) + shift
    else:
        h = _gn(h + e, s, f"{key}.out_layers.0")
    h = _conv(F.silu(h), s, f"{key}.out_layers.3")
    if f"{key}.skip_connection.weight" in s:
        x = F.conv2d(x, s[f"{key}.skip_connection.weight"], s[f"{key}.skip_connection.bias"])
    return x + h


def _attend(qkv, heads, legacy):
    """qkv (B, 3C, T) -> (B, C, T), ADM's QKVAttentionLegacy or QKVAttention."""
    b, width, length = qkv.shape
    d = width // (3 * heads)
    if legacy:
        q, k, v = qkv.reshape(b * heads, 3 * d, length).split(d, dim=1)
    else:
        q, k, v = (z.reshape(b * heads, d, length) for z in qkv.chunk(3, dim=1))
    scale = 1 / math.sqrt(math.sqrt(d))
    w = torch.einsum("bct,bcs->bts", q * scale, k * scale).to(_wide(qkv.dtype)).softmax(-1).to(qkv.dtype)
    return torch.einsum("bts,bcs->bct", w, v).reshape(b, -1, length)


def _attention(x, s, key, heads, legacy):
    b, c, hh, ww = x.shape
    flat = x.reshape(b, c, -1)
    qkv = F.conv1d(_gn(flat[..., None], s, f"{key}.norm")[..., 0], s[f"{key}.qkv.weight"], s[f"{key}.qkv.bias"])
    h = F.conv1d(_attend(qkv, heads, legacy), s[f"{key}.proj_out.weight"], s[f"{key}.proj_out.bias"])
    return (flat + h).reshape(b, c, hh, ww)


def _trunk(p, s, x, t, y=None):
    """Time embedding, input blocks and middle block: (h, emb, skips, ds)."""
    mc = p.model_channels
    half = mc // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    a = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(a), torch.sin(a)], dim=1).to(s["time_embed.0.weight"].dtype)
    emb = F.linear(F.silu(F.linear(emb, s["time_embed.0.weight"], s["time_embed.0.bias"])),
                   s["time_embed.2.weight"], s["time_embed.2.bias"])
    if y is not None:
        emb = emb + s["label_emb.weight"][y]
    legacy = not p.new_attention_order
    h = _conv(x, s, "input_blocks.0.0")
    skips, ds, k = [h], 1, 1
    for level, mult in enumerate(p.channel_mult):
        for _ in range(p.num_res_blocks):
            h = _resblock(h, emb, s, f"input_blocks.{k}.0", p.use_scale_shift_norm)
            if ds in p.attention_ds:
                h = _attention(h, s, f"input_blocks.{k}.1", p.heads(h.shape[1]), legacy)
            skips.append(h)
            k += 1
        if level != len(p.channel_mult) - 1:
            if p.resblock_updown:
                h = _resblock(h, emb, s, f"input_blocks.{k}.0", p.use_scale_shift_norm, "down")
            else:
                h = _conv(h, s, f"input_blocks.{k}.0.op", stride=2)
            skips.append(h)
            ds *= 2
            k += 1
    h = _resblock(h, emb, s, "middle_block.0", p.use_scale_shift_norm)
    h = _attention(h, s, "middle_block.1", p.heads(h.shape[1]), legacy)
    h = _resblock(h, emb, s, "middle_block.2", p.use_scale_shift_norm)
    return h, emb, skips, ds


def unet_forward(p, s, x, t, y=None):
    """ADM UNetModel forward: x (B, C, H, W), t (B,) -> (B, out_channels, H, W)."""
    h, emb, skips, ds = _trunk(p, s, x, t, y)
    legacy = not p.new_attention_order
    j = 0
    for level, mult in reversed(list(enumerate(p.channel_mult))):
        for i in range(p.num_res_blocks + 1):
            h = _resblock(torch.cat([h, skips.pop()], dim=1), emb, s, f"output_blocks.{j}.0", p.use_scale_shift_norm)
            at = 1
            if ds in p.attention_ds:
                h = _attention(h, s, f"output_blocks.{j}.1", p.heads(h.shape[1]), legacy)
                at = 2
            if level and i == p.num_res_blocks:
                if p.resblock_updown:
                    h = _resblock(h, emb, s, f"output_blocks.{j}.{at}", p.use_scale_shift_norm, "up")
                else:
                    h = _conv(F.interpolate(h, scale_factor=2, mode="nearest"), s, f"output_blocks.{j}.{at}.conv")
                ds //= 2
            j += 1
    return F.conv2d(F.silu(_gn(h, s, "out.0")), s["out.2.weight"], s["out.2.bias"], padding=1)

