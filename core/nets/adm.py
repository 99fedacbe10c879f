"""OpenAI ADM checkpoints (guided-diffusion, improved-diffusion) and the official minority classifier: presets
and the exact state-dict layout each one must have (issue 19, ``../shared/ADM.md``).

``layout(preset)`` lists every tensor name and shape a checkpoint of that preset holds, computed from the
architecture description alone (no network is built, so a 550M-parameter preset costs nothing); the
importer checks a file against it before any tensor is used, and the parameter counts are checked against
the published figures. ``core.nets.adm_flags`` builds a preset from the MODEL_FLAGS / CLASSIFIER_FLAGS string a
release prints (issue 25). ``read_checkpoint`` is the only way a ``.pt`` file is
opened: ``torch.load`` with ``weights_only=True`` on the CPU, never a full unpickle.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from core.errors import CheckpointError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class AdmPreset:
    """One released configuration. ``kind``: 'diffusion' (UNetModel) or 'classifier' (EncoderUNetModel with
    attention pooling). ``attention_resolutions`` are resolutions (ds = image_size // r); ``num_head_channels``
    -1 means a fixed ``num_heads``."""

    name: str
    kind: str
    image_size: int
    model_channels: int
    num_res_blocks: int
    channel_mult: tuple
    attention_resolutions: tuple
    num_heads: int = 4
    num_head_channels: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    new_attention_order: bool = False
    num_classes: int = 0  # diffusion: class-conditional label embedding rows
    in_channels: int = 3
    out_channels: int = 6  # diffusion: 3 (eps) or 6 (eps + learned-range v); classifier: its outputs K
    schedule: str = "linear"
    T: int = 1000
    rescale_timesteps: bool = False  # improved-diffusion: the model sees t * 1000 / T as a float
    sigma_small: bool = False  # improved-diffusion, without learn_sigma: fixed small (posterior) variance, not large
    source: str = ""  # the release and file it stands for
    published_params: Optional[float] = None  # millions, ADM.md's table
    extra: dict = field(default_factory=dict)

    @property
    def attention_ds(self) -> set:
        return {self.image_size // r for r in self.attention_resolutions}

    def heads(self, channels: int) -> int:
        return channels // self.num_head_channels if self.num_head_channels != -1 else self.num_heads


_GD256 = dict(image_size=256, model_channels=256, num_res_blocks=2, channel_mult=(1, 1, 2, 2, 4, 4),
              attention_resolutions=(32, 16, 8), num_head_channels=64, resblock_updown=True)
_CLF = dict(kind="classifier", model_channels=128, attention_resolutions=(32, 16, 8), num_head_channels=64,
            resblock_updown=True, out_channels=1000)
_PRESETS = [
    AdmPreset("gd-64-cond", "diffusion", 64, 192, 3, (1, 2, 3, 4), (32, 16, 8), num_head_channels=64,
              resblock_updown=True, new_attention_order=True, num_classes=1000, schedule="cosine",
              source="guided-diffusion 64x64_diffusion.pt", published_params=295.9),
    AdmPreset("gd-128-cond", "diffusion", 128, 256, 2, (1, 1, 2, 3, 4), (32, 16, 8), num_heads=4,
              resblock_updown=True, num_classes=1000, source="guided-diffusion 128x128_diffusion.pt",
              published_params=421.5),
    AdmPreset("gd-256-cond", "diffusion", **_GD256, num_classes=1000, source="guided-diffusion 256x256_diffusion.pt",
              published_params=553.8),
    AdmPreset("gd-256-uncond", "diffusion", **_GD256, source="guided-diffusion 256x256_diffusion_uncond.pt",
              published_params=552.8),
    AdmPreset("gd-512-cond", "diffusion", 512, 256, 2, (0.5, 1, 1, 2, 2, 4, 4), (32, 16, 8), num_head_channels=64,
              resblock_updown=True, num_classes=1000, source="guided-diffusion 512x512_diffusion.pt",
              published_params=559.0),
    AdmPreset("gd-lsun-bedroom", "diffusion", **_GD256, source="guided-diffusion lsun_bedroom.pt", published_params=552.8),
    AdmPreset("gd-lsun-cat", "diffusion", **_GD256, source="guided-diffusion lsun_cat.pt", published_params=552.8),
    AdmPreset("gd-lsun-horse", "diffusion", **_GD256, source="guided-diffusion lsun_horse.pt / lsun_horse_nodropout.pt",
              published_params=552.8),
    AdmPreset("id-cifar10", "diffusion", 32, 128, 3, (1, 2, 2, 2), (16, 8), num_heads=4, schedule="cosine", T=4000,
              rescale_timesteps=True, source="improved-diffusion cifar10_uncond(_vlb)_50M_500K.pt", published_params=52.5),
    AdmPreset("id-imagenet64-uncond", "diffusion", 64, 128, 3, (1, 2, 3, 4), (16, 8), num_heads=4, schedule="cosine",
              T=4000, rescale_timesteps=True, source="improved-diffusion imagenet64_uncond(_vlb)_100M_1500K.pt",
              published_params=121.1),
    AdmPreset("id-imagenet64-cond", "diffusion", 64, 192, 3, (1, 2, 3, 4), (16, 8), num_heads=4, num_classes=1000,
              schedule="cosine", T=4000, source="improved-diffusion imagenet64_cond_270M_250K.pt", published_params=273.0),
    AdmPreset("id-lsun", "diffusion", 256, 128, 2, (1, 1, 2, 2, 4, 4), (16,), num_heads=1, use_scale_shift_norm=False,
              source="improved-diffusion lsun_uncond_100M_{1200K_bs128,2400K_bs64}.pt", published_params=113.7),
    AdmPreset("gd-64-classifier", image_size=64, num_res_blocks=4, channel_mult=(1, 2, 3, 4),
              source="guided-diffusion 64x64_classifier.pt", published_params=65.4, **_CLF),
    AdmPreset("gd-128-classifier", image_size=128, num_res_blocks=2, channel_mult=(1, 1, 2, 3, 4),
              source="guided-diffusion 128x128_classifier.pt", published_params=42.6, **_CLF),
    AdmPreset("gd-256-classifier", image_size=256, num_res_blocks=2, channel_mult=(1, 1, 2, 2, 4, 4),
              source="guided-diffusion 256x256_classifier.pt", published_params=54.1, **_CLF),
    AdmPreset("gd-512-classifier", image_size=512, num_res_blocks=2, channel_mult=(0.5, 1, 1, 2, 2, 4, 4),
              source="guided-diffusion 512x512_classifier.pt", published_params=54.5, **_CLF),
    # the official LSUN minority classifier's head: an encoder over the 256 classifier's 512 x 8 x 8 middle features
    AdmPreset("mc-lsun-head", "classifier", 8, 128, 2, (1,), (8,), num_head_channels=64, in_channels=512,
              out_channels=100, source="minority-guidance mc_lsun.pt", published_params=2.90, extra={"tensors": 71}),
]
PRESETS = {p.name: p for p in _PRESETS}


def preset(name: str) -> AdmPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown --preset {name!r}; allowed: {', '.join(PRESETS)} (or 'list')")
    return PRESETS[name]


def describe(p: AdmPreset) -> str:
    """One line for ``--preset list``."""
    cond = "class-conditional" if p.num_classes else "unconditional"
    what = (f"{p.out_channels}-way classifier" if p.kind == "classifier" else
            f"{cond}, {p.schedule}/{p.T}" + (", t*1000/T" if p.rescale_timesteps else ""))
    return (f"{p.name:22s} {p.kind:10s} {p.image_size:4d}px  {what:38s} {count_parameters(p) / 1e6:7.1f}M  "
            f"({p.source})")


# ---- the state-dict layout ----------------------------------------------------------------------
def _norm(s: dict, key: str, c: int) -> None:
    s[f"{key}.weight"], s[f"{key}.bias"] = (c,), (c,)


def _conv(s: dict, key: str, cout: int, cin: int, k: int) -> None:
    s[f"{key}.weight"] = (cout, cin, k, k)
    s[f"{key}.bias"] = (cout,)


def _resblock(s: dict, key: str, p: AdmPreset, cin: int, cout: int) -> None:
    emb = 4 * p.model_channels
    _norm(s, f"{key}.in_layers.0", cin)
    _conv(s, f"{key}.in_layers.2", cout, cin, 3)
    s[f"{key}.emb_layers.1.weight"] = (2 * cout if p.use_scale_shift_norm else cout, emb)
    s[f"{key}.emb_layers.1.bias"] = (2 * cout if p.use_scale_shift_norm else cout,)
    _norm(s, f"{key}.out_layers.0", cout)
    _conv(s, f"{key}.out_layers.3", cout, cout, 3)
    if cin != cout:
        s[f"{key}.skip_connection.weight"], s[f"{key}.skip_connection.bias"] = (cout, cin, 1, 1), (cout,)


def _attention(s: dict, key: str, c: int) -> None:
    _norm(s, f"{key}.norm", c)
    s[f"{key}.qkv.weight"], s[f"{key}.qkv.bias"] = (3 * c, c, 1), (3 * c,)
    s[f"{key}.proj_out.weight"], s[f"{key}.proj_out.bias"] = (c, c, 1), (c,)


def layout(p: AdmPreset) -> dict:
    """Every tensor of a checkpoint of preset ``p``: {name: shape}, in the order the modules are built."""
    mc = p.model_channels
    s: dict = {}
    s["time_embed.0.weight"], s["time_embed.0.bias"] = (4 * mc, mc), (4 * mc,)
    s["time_embed.2.weight"], s["time_embed.2.bias"] = (4 * mc, 4 * mc), (4 * mc,)
    if p.kind == "diffusion" and p.num_classes:
        s["label_emb.weight"] = (p.num_classes, 4 * mc)
    ch = int(p.channel_mult[0] * mc)
    _conv(s, "input_blocks.0.0", ch, p.in_channels, 3)
    skips, ds, k = [ch], 1, 1
    last = len(p.channel_mult) - 1
    for level, mult in enumerate(p.channel_mult):
        for _ in range(p.num_res_blocks):
            _resblock(s, f"input_blocks.{k}.0", p, ch, int(mult * mc))
            ch = int(mult * mc)
            if ds in p.attention_ds:
                _attention(s, f"input_blocks.{k}.1", ch)
            skips.append(ch)
            k += 1
        if level != last:
            if p.resblock_updown:
                _resblock(s, f"input_blocks.{k}.0", p, ch, ch)
            else:
                s[f"input_blocks.{k}.0.op.weight"], s[f"input_blocks.{k}.0.op.bias"] = (ch, ch, 3, 3), (ch,)
            skips.append(ch)
            ds *= 2
            k += 1
    _resblock(s, "middle_block.0", p, ch, ch)
    _attention(s, "middle_block.1", ch)
    _resblock(s, "middle_block.2", p, ch, ch)
    if p.kind == "classifier":
        _norm(s, "out.0", ch)
        side = p.image_size // 2 ** last
        s["out.2.positional_embedding"] = (ch, side * side + 1)
        s["out.2.qkv_proj.weight"], s["out.2.qkv_proj.bias"] = (3 * ch, ch, 1), (3 * ch,)
        s["out.2.c_proj.weight"], s["out.2.c_proj.bias"] = (p.out_channels, ch, 1), (p.out_channels,)
        return s
    j = 0
    for level, mult in reversed(list(enumerate(p.channel_mult))):
        for i in range(p.num_res_blocks + 1):
            _resblock(s, f"output_blocks.{j}.0", p, ch + skips.pop(), int(mc * mult))
            ch = int(mc * mult)
            at = 1
            if ds in p.attention_ds:
                _attention(s, f"output_blocks.{j}.1", ch)
                at = 2
            if level and i == p.num_res_blocks:
                if p.resblock_updown:
                    _resblock(s, f"output_blocks.{j}.{at}", p, ch, ch)
                else:
                    s[f"output_blocks.{j}.{at}.conv.weight"], s[f"output_blocks.{j}.{at}.conv.bias"] = (ch, ch, 3, 3), (ch,)
                ds //= 2
            j += 1
    _norm(s, "out.0", ch)
    _conv(s, "out.2", p.out_channels, ch, 3)
    return s


def count_parameters(p: AdmPreset) -> int:
    return sum(prod(shape) for shape in layout(p).values())


def tiny(p: AdmPreset, **changes) -> AdmPreset:
    """A small-width copy of a preset for tests (same structure, fewer channels)."""
    return replace(p, **changes)


FLAGS_NAME = "--flags"  # the name of a preset built from flags that no released preset has


# ---- reading a checkpoint -----------------------------------------------------------------------
_SNIFF_BYTES = 64 * 1024


def _looks_like_pickle(head: bytes) -> bool:
    """Whether ``head`` (a file's first bytes) starts a pickle of protocol 2-5, as torch.save's legacy format
    and pickle.dump write: a PROTO opcode, then opcodes that pickletools can parse (it reads them, it never
    runs them) up to STOP or to the end of the bytes read."""
    import io
    import pickletools

    if len(head) < 2 or head[0] != 0x80 or not 2 <= head[1] <= 5:
        return False
    stream = io.BytesIO(head)
    try:
        for op, _, _ in pickletools.genops(stream):
            if op.name == "STOP":
                return True
    except ValueError:  # an unknown opcode, or the bytes read end inside an argument
        return stream.tell() >= len(head)
    return True


def _refusal_detail(e: Exception) -> str:
    """The loader's own reason (e.g. 'Unsupported global: GLOBAL io.open was not an allowed global by default'),
    without its advice to re-run with weights_only=False or to allow-list the global."""
    import re

    text = str(e)
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n|$)", text)
    detail = m.group(1) if m else (text.strip().splitlines() or [type(e).__name__])[0]
    return detail.split(". Please")[0].strip()[:160]


def read_checkpoint(path: str | os.PathLike, flag: str = "--checkpoint") -> dict:
    """The tensors of a ``.pt`` state dict, read with ``torch.load(weights_only=True)`` on the CPU (a pickle
    that would run code is refused, not run); one CheckpointError line for anything else, naming ``flag`` (the
    command-line option the file came from). A file that is neither a zip archive (torch.save's format) nor a
    pickle (its legacy format) is refused before torch.load sees it."""
    import pickle
    import warnings

    import torch

    path = Path(path)
    where = f"{flag} {path}"
    if not path.is_file():
        raise CheckpointError(f"{where}: no such file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(_SNIFF_BYTES)
    except OSError as e:
        raise CheckpointError(f"{where}: cannot be read ({e.strerror or type(e).__name__})") from None
    if not head:
        raise CheckpointError(f"{where}: an empty file, not a PyTorch checkpoint")
    if not head.startswith(b"PK\x03\x04") and not _looks_like_pickle(head):
        raise CheckpointError(f"{where}: not a PyTorch checkpoint (neither a zip archive nor a pickle; it starts "
                              f"with bytes {head[:4].hex(' ')})")
    try:
        with warnings.catch_warnings():  # its note on a pickle protocol other than 2 would be a second line
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{where}: refused by the weights-only loader (a pickle holding more than plain "
                              f"tensors; it is never unpickled): {_refusal_detail(e)}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{where}: not a readable PyTorch checkpoint (truncated or damaged?): "
                              f"{first[:160]}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{where}: holds a {type(obj).__name__}, not a state dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def check_layout(state: dict, p: AdmPreset, source: str) -> None:
    """Refuse a state dict that is not exactly preset ``p``'s layout, naming the first missing, unexpected or
    mis-shaped key and the preset whose layout does match, if one does; then refuse non-finite weights."""
    import torch

    want = layout(p)
    from_flags = p.name == FLAGS_NAME
    problem = None
    for key, shape in want.items():
        if key not in state:
            problem = f"missing key {key!r}"
            break
        if tuple(state[key].shape) != shape:
            problem = (f"key {key!r} has shape {tuple(state[key].shape)}, "
                       f"{'--flags need' if from_flags else f'preset {p.name} needs'} {shape}")
            break
    if problem is None:
        extra = [k for k in state if k not in want]
        if extra:
            problem = f"unexpected key {extra[0]!r}"
    if problem is not None:
        match = matching_preset(state)
        hint = (f"; its layout is preset {match.name} ({match.kind})" if match is not None else
                "; no preset has its layout")
        what = "the layout --flags describe" if from_flags else f"a {p.name} checkpoint"
        raise CheckpointError(f"{source}: not {what} ({p.kind}): {problem}{hint}")
    for key, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{source}: tensor {key!r} holds NaN or infinite values")


def matching_preset(state: dict) -> Optional[AdmPreset]:
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for p in PRESETS.values():
        if layout(p) == shapes:
            return p
    return None


# ---- ADM UNetModel -> diffusers UNet2DModel ------------------------------------------------------
def unet_config(p: AdmPreset) -> dict:
    """The diffusers UNet2DModel config that has the same structure as preset ``p`` (a diffusion preset)."""
    if p.kind != "diffusion":
        raise ValueError(f"preset {p.name} is a {p.kind}, not a diffusion model")
    attn = [2 ** lvl in p.attention_ds for lvl in range(len(p.channel_mult))]
    down, up = [], []
    for a in attn:
        down.append("AttnDownBlock2D" if a else ("ResnetDownsampleBlock2D" if p.resblock_updown else "DownBlock2D"))
    for a in reversed(attn):
        up.append("AttnUpBlock2D" if a else ("ResnetUpsampleBlock2D" if p.resblock_updown else "UpBlock2D"))
    return dict(
        sample_size=p.image_size, in_channels=p.in_channels, out_channels=p.out_channels,
        time_embedding_type="positional", flip_sin_to_cos=True, freq_shift=0,  # ADM: cos first, exp(-ln 1e4 i / half)
        down_block_types=tuple(down), up_block_types=tuple(up),
        block_out_channels=tuple(int(m * p.model_channels) for m in p.channel_mult),
        layers_per_block=p.num_res_blocks, mid_block_scale_factor=1, downsample_padding=1,
        downsample_type="resnet" if p.resblock_updown else "conv", upsample_type="resnet" if p.resblock_updown else "conv",
        act_fn="silu", attention_head_dim=p.num_head_channels if p.num_head_channels != -1 else None,
        norm_num_groups=32, attn_norm_num_groups=32, norm_eps=1e-5,
        resnet_time_scale_shift="scale_shift" if p.use_scale_shift_norm else "default",
        add_attention=True, num_class_embeds=p.num_classes or None, dropout=0.0)


def _res_keys(src: str, dst: str) -> list:
    return [(f"{src}.in_layers.0", f"{dst}.norm1"), (f"{src}.in_layers.2", f"{dst}.conv1"),
            (f"{src}.emb_layers.1", f"{dst}.time_emb_proj"), (f"{src}.out_layers.0", f"{dst}.norm2"),
            (f"{src}.out_layers.3", f"{dst}.conv2"), (f"{src}.skip_connection", f"{dst}.conv_shortcut")]


def _module_map(p: AdmPreset) -> list:
    """[(ADM module prefix, diffusers module prefix, kind)] with kind in {'res', 'attn', 'plain'}."""
    m = [("time_embed.0", "time_embedding.linear_1", "plain"), ("time_embed.2", "time_embedding.linear_2", "plain"),
         ("input_blocks.0.0", "conv_in", "plain"), ("out.0", "conv_norm_out", "plain"), ("out.2", "conv_out", "plain")]
    if p.num_classes:
        m.append(("label_emb", "class_embedding", "plain"))
    n_levels, k = len(p.channel_mult), 1
    for lvl in range(n_levels):
        attn = 2 ** lvl in p.attention_ds
        for i in range(p.num_res_blocks):
            m.append((f"input_blocks.{k}.0", f"down_blocks.{lvl}.resnets.{i}", "res"))
            if attn:
                m.append((f"input_blocks.{k}.1", f"down_blocks.{lvl}.attentions.{i}", "attn"))
            k += 1
        if lvl != n_levels - 1:
            if p.resblock_updown:
                m.append((f"input_blocks.{k}.0", f"down_blocks.{lvl}.downsamplers.0", "res"))
            else:
                m.append((f"input_blocks.{k}.0.op", f"down_blocks.{lvl}.downsamplers.0.conv", "plain"))
            k += 1
    m += [("middle_block.0", "mid_block.resnets.0", "res"), ("middle_block.1", "mid_block.attentions.0", "attn"),
          ("middle_block.2", "mid_block.resnets.1", "res")]
    j = 0
    for u, lvl in enumerate(reversed(range(n_levels))):
        attn = 2 ** lvl in p.attention_ds
        for i in range(p.num_res_blocks + 1):
            m.append((f"output_blocks.{j}.0", f"up_blocks.{u}.resnets.{i}", "res"))
            at = 1
            if attn:
                m.append((f"output_blocks.{j}.1", f"up_blocks.{u}.attentions.{i}", "attn"))
                at = 2
            if lvl and i == p.num_res_blocks:
                if p.resblock_updown:
                    m.append((f"output_blocks.{j}.{at}", f"up_blocks.{u}.upsamplers.0", "res"))
                else:
                    m.append((f"output_blocks.{j}.{at}.conv", f"up_blocks.{u}.upsamplers.0.conv", "plain"))
            j += 1
    return m


def _split_qkv(w: "torch.Tensor", heads: int, legacy: bool) -> tuple:
    """ADM's fused qkv rows (3C, ...) as separate q, k, v rows (C, ...) in the head-major order diffusers uses:
    the new order is [q | k | v], the legacy order is [q_h | k_h | v_h] per head."""
    if not legacy:
        return tuple(w.chunk(3, dim=0))
    d = w.shape[0] // (3 * heads)
    per_head = w.reshape(heads, 3, d, *w.shape[1:])
    return tuple(per_head[:, i].reshape(heads * d, *w.shape[1:]) for i in range(3))


def convert_unet(state: dict, p: AdmPreset) -> dict:
    """An ADM diffusion state dict (checked against ``layout(p)``) as a diffusers UNet2DModel state dict."""
    out = {}
    for src, dst, kind in _module_map(p):
        if kind == "plain":
            for suffix in ("weight", "bias"):
                if f"{src}.{suffix}" in state:
                    out[f"{dst}.{suffix}"] = state[f"{src}.{suffix}"]
        elif kind == "res":
            for a, b in _res_keys(src, dst):
                for suffix in ("weight", "bias"):
                    if f"{a}.{suffix}" in state:
                        out[f"{b}.{suffix}"] = state[f"{a}.{suffix}"]
        else:
            c = state[f"{src}.norm.weight"].shape[0]
            out[f"{dst}.group_norm.weight"], out[f"{dst}.group_norm.bias"] = state[f"{src}.norm.weight"], state[f"{src}.norm.bias"]
            heads = p.heads(c)
            qw = _split_qkv(state[f"{src}.qkv.weight"][..., 0], heads, not p.new_attention_order)
            qb = _split_qkv(state[f"{src}.qkv.bias"], heads, not p.new_attention_order)
            for name, w, b in zip(("to_q", "to_k", "to_v"), qw, qb):
                out[f"{dst}.{name}.weight"], out[f"{dst}.{name}.bias"] = w.contiguous(), b.contiguous()
            out[f"{dst}.to_out.0.weight"] = state[f"{src}.proj_out.weight"][..., 0]
            out[f"{dst}.to_out.0.bias"] = state[f"{src}.proj_out.bias"]
    return out


def build_unet2d(p: AdmPreset):
    """An empty diffusers UNet2DModel shaped as preset ``p``; what its config cannot express is set on the
    modules after construction: a fixed head count (``num_heads``) and a time embedding wider than the first
    block (``channel_mult[0] < 1``); the run folder records both, so the loader rebuilds them."""
    from diffusers import UNet2DModel

    from core.nets.models import set_attention_heads, set_time_channels

    net = UNet2DModel(**unet_config(p))
    if p.num_head_channels == -1:
        set_attention_heads(net, p.num_heads)
    if int(p.channel_mult[0] * p.model_channels) != p.model_channels:  # ADM 512: time embedding at model_channels
        set_time_channels(net, p.model_channels)
    return net


def adm_schedule(p: AdmPreset):
    """The preset's training schedule as ADM builds it (linear betas scaled by 1000 / T; cosine with s = 0.008)."""
    from core.maths.schedule import make_schedule

    if p.schedule == "linear":
        return make_schedule("linear", p.T, 1e-4 * 1000 / p.T, 0.02 * 1000 / p.T)
    return make_schedule("cosine", p.T)


def new_folder(out: str | os.PathLike) -> Path:
    """``out`` as a Path, refused (one line) when it exists and is not an empty folder."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"--out {out}: exists and is not empty; choose a new folder")
    return out


def variance_type(p: AdmPreset) -> str:
    """ADM's model_var_type: learned range with ``learn_sigma`` (2C outputs), else fixed large (beta) unless
    improved-diffusion's ``sigma_small`` asks for the posterior variance."""
    if p.out_channels == 2 * p.in_channels:
        return "learned_range"
    return "fixed_small" if p.sigma_small else "fixed_large"


def import_diffusion(checkpoint: str | os.PathLike, p: AdmPreset, out: str | os.PathLike,
                     log=lambda msg: None, record: Optional[dict] = None) -> Path:
    """An ADM diffusion checkpoint as an ordinary run folder (diffusers UNet2DModel weights + model.json with the
    schedule, ADM's variance type, class conditioning and rescaled timesteps; ``record``, e.g. the parsed
    ``--flags``, is kept there as ``adm_flags``). Checked against the preset before any tensor is used; written
    to a temp folder beside ``out`` and renamed, so a failure writes nothing."""
    from core.nets.checkpoint import commit_folder
    from core.nets.models import DiffusionModel, save_model_run

    if p.kind != "diffusion":
        raise ValueError(f"--preset {p.name} is a {p.kind}: use import-adm-classifier")
    out = new_folder(out)
    state = read_checkpoint(checkpoint, "--checkpoint")
    check_layout(state, p, f"--checkpoint {checkpoint}")
    log(f"{checkpoint}: {len(state)} tensors, {sum(v.numel() for v in state.values()) / 1e6:.1f}M parameters, "
        f"layout of {p.name}")
    net = build_unet2d(p)
    net.load_state_dict({k: v.float() for k, v in convert_unet(state, p).items()}, strict=True)
    model = DiffusionModel(net.eval(), adm_schedule(p), p.image_size, p.in_channels, p.num_classes,
                           source=str(checkpoint), variance_type=variance_type(p),
                           timestep_scale=1000 / p.T if p.rescale_timesteps else 1.0)
    extra = {"source": str(checkpoint), "adm_preset": p.name, **({"adm_flags": record} if record else {})}
    return commit_folder(out, lambda tmp: save_model_run(tmp, model, extra))
