"""A reference forward of ADM's noise-conditioned classifiers (EncoderUNetModel with attention pooling) and of
the official minority classifier (``head(trunk_features(x_t, t), t)``), written from ../shared/ADM.md's
description alone, for the equivalence tests of core/nets/adm_encoder.py (issue 24).

It shares no code with core/nets/adm_encoder.py nor with tests/adm_reference.py, and is written differently
on purpose: GroupNorm is spelled out (group mean and biased variance), average pooling is a reshape and a
mean, 1x1 convolutions are matrix products, and attention runs one head at a time, taking each head's q, k
and v rows by index from the fused qkv rows (legacy order: ``[q_h | k_h | v_h]`` per head; new order:
``[q | k | v]``), with ``softmax(q^T k / sqrt(d))``, which equals ADM's ``(q d^-1/4)^T (k d^-1/4)``.

It reads the ADM state dict (name -> tensor) and the preset's plain fields (no helper of core.nets.adm), and
runs in the dtype of the weights; the tests use float64. Only the sinusoidal timestep embedding is computed
in fp32, as ADM does ("t is cast to float"), and then cast to the weights' dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

GN_GROUPS, GN_EPS = 32, 1e-5  # ADM.md: normalization(c) = GroupNorm(32, c), eps 1e-5
POOL_HEAD_CHANNELS = 64  # ADM.md: the attention pool has C / 64 heads


def group_norm(x, weight, bias):
    """GroupNorm(32) over (B, C, ...): each sample's group of C/32 channels (all positions) normalised by its
    mean and biased variance, then the per-channel affine."""
    b, c = x.shape[:2]
    g = x.reshape(b, GN_GROUPS, -1)
    mean = g.mean(dim=-1, keepdim=True)
    var = ((g - mean) ** 2).mean(dim=-1, keepdim=True)
    y = ((g - mean) / torch.sqrt(var + GN_EPS)).reshape(x.shape)
    view = (1, c) + (1,) * (x.dim() - 2)
    return y * weight.reshape(view) + bias.reshape(view)


def _norm(x, s, key):
    return group_norm(x, s[f"{key}.weight"], s[f"{key}.bias"])


def _conv3(x, s, key, stride=1):
    return F.conv2d(x, s[f"{key}.weight"], s[f"{key}.bias"], stride=stride, padding=1)


def _pointwise(x, weight, bias):
    """A kernel-1 convolution over (B, C_in, T) as a matrix product: weight (C_out, C_in, 1[, 1])."""
    w = weight.reshape(weight.shape[0], weight.shape[1])
    return torch.einsum("oi,bit->bot", w, x) + bias[None, :, None]


def _halve(x):
    """2x2 average pooling, stride 2."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).mean(dim=(3, 5))


def timestep_embedding(t, dim, dtype):
    """ADM.md: half = dim // 2, f_i = exp(-ln(10000) i / half), [cos(t f), sin(t f)] (cos first), in fp32."""
    half = dim // 2
    f = torch.exp(torch.arange(half, dtype=torch.float32) * (-math.log(10000.0) / half))
    arg = t.to(torch.float32).reshape(-1, 1) * f.reshape(1, -1)
    return torch.cat([arg.cos(), arg.sin()], dim=1).to(dtype)


def heads_attention(qkv, heads, legacy):
    """(B, 3C, T) fused q, k, v rows -> (B, C, T), one head at a time."""
    c = qkv.shape[1] // 3
    d = c // heads
    out = []
    for h in range(heads):
        if legacy:  # per head: rows [3dh, 3dh + d) are q, the next d are k, the next d are v
            q, k, v = (qkv[:, 3 * d * h + i * d: 3 * d * h + (i + 1) * d] for i in range(3))
        else:  # all q rows, then all k rows, then all v rows; head h takes rows [dh, dh + d) of each
            q, k, v = (qkv[:, i * c + d * h: i * c + d * (h + 1)] for i in range(3))
        logits = torch.matmul(q.transpose(1, 2), k) / math.sqrt(d)  # (B, T query, S key)
        weights = torch.softmax(logits, dim=-1)
        out.append(torch.matmul(weights, v.transpose(1, 2)).transpose(1, 2))  # (B, d, T)
    return torch.cat(out, dim=1)


def res_block(x, emb, s, key, scale_shift, down=False):
    """ADM.md's ResBlock, optionally the downsampling one (pool after the norm and activation, on both paths)."""
    h = F.silu(_norm(x, s, f"{key}.in_layers.0"))
    if down:
        h, x = _halve(h), _halve(x)
    h = _conv3(h, s, f"{key}.in_layers.2")
    e = F.linear(F.silu(emb), s[f"{key}.emb_layers.1.weight"], s[f"{key}.emb_layers.1.bias"])[:, :, None, None]
    if scale_shift:
        co = h.shape[1]
        scale, shift = e[:, :co], e[:, co:]
        h = _norm(h, s, f"{key}.out_layers.0") * (1 + scale) + shift
    else:
        h = _norm(h + e, s, f"{key}.out_layers.0")
    h = _conv3(F.silu(h), s, f"{key}.out_layers.3")
    if f"{key}.skip_connection.weight" in s:
        x = F.conv2d(x, s[f"{key}.skip_connection.weight"], s[f"{key}.skip_connection.bias"])
    return x + h


def attention_block(x, s, key, heads, legacy):
    """ADM.md's AttentionBlock: the residual is added to the un-normalised x."""
    b, c, hh, ww = x.shape
    flat = x.reshape(b, c, hh * ww)
    qkv = _pointwise(_norm(flat, s, f"{key}.norm"), s[f"{key}.qkv.weight"], s[f"{key}.qkv.bias"])
    out = _pointwise(heads_attention(qkv, heads, legacy), s[f"{key}.proj_out.weight"], s[f"{key}.proj_out.bias"])
    return x + out.reshape(b, c, hh, ww)


def trunk_features(p, s, x, t):
    """Time embedding, input blocks and middle block of an EncoderUNetModel: the middle block's output, in
    x's dtype (the minority head's input)."""
    dtype = s["time_embed.0.weight"].dtype
    emb = timestep_embedding(t, p.model_channels, dtype)
    emb = F.linear(F.silu(F.linear(emb, s["time_embed.0.weight"], s["time_embed.0.bias"])),
                   s["time_embed.2.weight"], s["time_embed.2.bias"])
    attended = {p.image_size // r for r in p.attention_resolutions}
    legacy = not p.new_attention_order

    def n_heads(c):
        return c // p.num_head_channels if p.num_head_channels != -1 else p.num_heads

    h = _conv3(x.to(dtype), s, "input_blocks.0.0")
    block, ds = 1, 1
    for level, mult in enumerate(p.channel_mult):
        width = int(mult * p.model_channels)
        for _ in range(p.num_res_blocks):
            h = res_block(h, emb, s, f"input_blocks.{block}.0", p.use_scale_shift_norm)
            if ds in attended:
                h = attention_block(h, s, f"input_blocks.{block}.1", n_heads(width), legacy)
            block += 1
        if level < len(p.channel_mult) - 1:
            if p.resblock_updown:
                h = res_block(h, emb, s, f"input_blocks.{block}.0", p.use_scale_shift_norm, down=True)
            else:
                h = _conv3(h, s, f"input_blocks.{block}.0.op", stride=2)
            block += 1
            ds *= 2
    h = res_block(h, emb, s, "middle_block.0", p.use_scale_shift_norm)
    h = attention_block(h, s, "middle_block.1", n_heads(h.shape[1]), legacy)
    h = res_block(h, emb, s, "middle_block.2", p.use_scale_shift_norm)
    return h.to(x.dtype)


def attention_pool(h, s):
    """ADM.md's AttentionPool2d head on GN -> SiLU'd features (B, C, S, S): the spatial mean as token 0,
    positions added, qkv projection, new-order attention with C / 64 heads, c_proj; token 0 -> (B, K)."""
    b, c = h.shape[:2]
    tokens = h.reshape(b, c, -1)
    tokens = torch.cat([tokens.mean(dim=2, keepdim=True), tokens], dim=2) + s["out.2.positional_embedding"][None]
    qkv = _pointwise(tokens, s["out.2.qkv_proj.weight"], s["out.2.qkv_proj.bias"])
    att = heads_attention(qkv, c // POOL_HEAD_CHANNELS, legacy=False)
    return _pointwise(att, s["out.2.c_proj.weight"], s["out.2.c_proj.bias"])[:, :, 0]


def classifier_logits(p, s, x, t):
    """EncoderUNetModel(pool='attention'): x (B, C, H, W), t (B,) -> logits (B, K)."""
    h = trunk_features(p, s, x, t).to(s["out.0.weight"].dtype)
    return attention_pool(F.silu(_norm(h, s, "out.0")), s)


def cascade_logits(trunk_p, trunk_s, head_p, head_s, x, t):
    """The minority classifier: the head's logits on the trunk's middle-block features, both at the same t."""
    return classifier_logits(head_p, head_s, trunk_features(trunk_p, trunk_s, x, t), t)
