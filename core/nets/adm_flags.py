"""MODEL_FLAGS / CLASSIFIER_FLAGS: an ADM layout from the flags string a guided-diffusion or improved-diffusion
README prints (issue 25), with each codebase's own defaults for absent flags. ``parse_flags`` builds a preset
(the released preset's own name where the flags describe one, else ``FLAGS_NAME``), ``preset_flags`` writes a
preset back as such a string, ``same_model`` compares two presets by what decides the converted network.
Split from ``core.nets.adm`` (presets, layouts, the checkpoint reader and the converter), which it builds on.
"""
from __future__ import annotations

from dataclasses import dataclass

from core.nets.adm import FLAGS_NAME, PRESETS, AdmPreset, variance_type

# ---- MODEL_FLAGS / CLASSIFIER_FLAGS: a layout from the flags an ADM README prints --------------------
NUM_CLASSES = 1000  # ADM's class_cond: ImageNet's classes
CODEBASES = {"guided": "guided-diffusion", "improved": "improved-diffusion"}

# each codebase's own model_and_diffusion_defaults (script_util.py); a flag's type is its default's
_DIFFUSION_DEFAULTS = dict(learn_sigma=False, diffusion_steps=1000, noise_schedule="linear", timestep_respacing="",
                           use_kl=False, predict_xstart=False, rescale_timesteps=False, rescale_learned_sigmas=False)
FLAG_DEFAULTS = {
    "guided": dict(image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
                   num_head_channels=-1, attention_resolutions="16,8", channel_mult="", dropout=0.0, class_cond=False,
                   use_checkpoint=False, use_scale_shift_norm=True, resblock_updown=False, use_fp16=False,
                   use_new_attention_order=False, **_DIFFUSION_DEFAULTS),
    "improved": dict(image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
                     attention_resolutions="16,8", dropout=0.0, learn_sigma=False, sigma_small=False, class_cond=False,
                     diffusion_steps=1000, noise_schedule="linear", timestep_respacing="", use_kl=False,
                     predict_xstart=False, rescale_timesteps=True, rescale_learned_sigmas=True, use_checkpoint=False,
                     use_scale_shift_norm=True),
}
# guided-diffusion's classifier_defaults and the diffusion flags its classifier scripts take beside them;
# classifier_scale is printed inside the README's CLASSIFIER_FLAGS (a sampling setting); latent_size (the
# head's input side, which replaces image_size), in_channels and out_channels are minority-guidance's
CLASSIFIER_FLAG_DEFAULTS = dict(image_size=64, classifier_use_fp16=False, classifier_width=128, classifier_depth=2,
                                classifier_attention_resolutions="32,16,8", classifier_use_scale_shift_norm=True,
                                classifier_resblock_updown=True, classifier_pool="attention", classifier_scale=1.0,
                                latent_size=None, in_channels=3, out_channels=1000, **_DIFFUSION_DEFAULTS)
# channel_mult when the flags give none (create_model / create_classifier); 32 is improved-diffusion's (and that
# of minority-guidance's guided-diffusion fork), 8 the minority-guidance classifier's
_CHANNEL_MULT = {
    "guided": {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4),
               32: (1, 2, 2, 2)},
    "improved": {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)},
    "classifier": {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4),
                   8: (1,)},
}
_INT_FLAGS = {"latent_size"}  # a None default: the type is int
_POOLS = ("adaptive", "attention", "spatial", "spatial_v2")  # EncoderUNetModel's; attention is the one supported


@dataclass(frozen=True)
class ParsedFlags:
    """What ``parse_flags`` made of a flags string: the ``preset`` (a released one when the flags describe its
    exact model, else one named ``FLAGS_NAME``), every flag's value with ADM's defaults filled in, and ``notes``
    (one line each: what is recorded but not applied)."""

    preset: AdmPreset
    codebase: str
    text: str
    values: dict
    given: tuple
    notes: tuple = ()

    def record(self) -> dict:
        """What the run or classifier folder keeps (``adm_flags``)."""
        return {"codebase": CODEBASES[self.codebase], "flags": self.text, "given": list(self.given),
                "values": dict(self.values)}


def _flag_value(name: str, raw: str, default):
    """``raw`` as the type of ``default``: booleans as ADM's str2bool reads them, int, float, str."""
    if isinstance(default, bool):
        low = raw.lower()
        if low in ("yes", "true", "t", "y", "1"):
            return True
        if low in ("no", "false", "f", "n", "0"):
            return False
        raise ValueError(f"--flags: --{name} {raw!r}: expected a boolean (True or False)")
    if isinstance(default, int) or name in _INT_FLAGS:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"--flags: --{name} {raw!r}: expected an integer") from None
    if isinstance(default, float):
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"--flags: --{name} {raw!r}: expected a finite number")
        return value
    return raw


def _int_list(name: str, raw: str) -> tuple:
    try:
        values = tuple(int(v) for v in raw.split(","))
    except ValueError:
        values = ()
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"--flags: --{name} {raw!r}: expected positive integers separated by commas")
    return values


def _unknown_flag(name: str, kind: str, codebase: str) -> str:
    where = CODEBASES[codebase]
    if kind == "diffusion":
        other = "improved" if codebase == "guided" else "guided"
        if name in FLAG_DEFAULTS[other]:
            return (f"--flags: --{name} is not one of {where}'s flags (it is {CODEBASES[other]}'s: add "
                    f"--codebase {other})")
        if name in CLASSIFIER_FLAG_DEFAULTS:
            return f"--flags: --{name} is a classifier flag (import-adm-classifier --flags takes it)"
    elif name in FLAG_DEFAULTS["guided"] or name in FLAG_DEFAULTS["improved"]:
        return f"--flags: --{name} is a diffusion-model flag (import-adm --flags takes it)"
    what = "model or diffusion" if kind == "diffusion" else "classifier"
    return (f"--flags: unknown flag --{name} (not a {what} flag of {where}; sampling and training flags such as "
            f"--batch_size do not belong here)")


def _read_flags(text: str, defaults: dict, kind: str, codebase: str) -> tuple:
    """(values, given names) of a flags string: ``--name value`` or ``--name=value`` pairs, as ADM's argparse
    reads them (a repeated flag must repeat its value)."""
    import shlex

    try:
        words = shlex.split(text)
    except ValueError as e:
        raise ValueError(f"--flags: cannot be split into words ({e})") from None
    if not words:
        raise ValueError("--flags: empty; give the MODEL_FLAGS (and DIFFUSION_FLAGS) string the release prints")
    values, given, i = dict(defaults), {}, 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--") or word == "--":
            raise ValueError(f"--flags: expected --NAME VALUE, got {word!r}")
        name, eq, raw = word[2:].partition("=")
        if name not in defaults:
            raise ValueError(_unknown_flag(name, kind, codebase))
        if eq:
            i += 1
        elif i + 1 < len(words) and not words[i + 1].startswith("--"):
            raw, i = words[i + 1], i + 2
        else:
            raise ValueError(f"--flags: --{name} has no value")
        value = _flag_value(name, raw, defaults[name])
        if name in given and given[name] != value:
            raise ValueError(f"--flags: --{name} given twice with different values ({given[name]!r}, {value!r})")
        given[name] = values[name] = value
    return values, tuple(given)


def _respacing_note(v: str, T: int) -> str:
    """Check ``--timestep_respacing`` as ADM's space_timesteps would, and say what our sampler does instead."""
    what = f"--timestep_respacing {v!r} recorded; sampling steps are sample's --steps"
    if v.startswith("ddim"):
        try:
            n = int(v[4:])
        except ValueError:
            raise ValueError(f"--flags: --timestep_respacing {v!r}: expected ddimN, N an integer") from None
        strides = [k for k in range(1, T) if len(range(0, T, k)) == n]
        if not strides:
            raise ValueError(f"--flags: --timestep_respacing {v!r}: ADM cannot make exactly {n} steps out of "
                             f"{T} with an integer stride")
        return (f"{what}, spaced as ADM's --timestep_respacing {n} spaces them (0 ... {T - 1}), not by "
                f"ddim's integer stride {strides[0]} (0 ... {strides[0] * (n - 1)})")
    sections = _int_list("timestep_respacing", v)
    size, extra = divmod(T, len(sections))
    for k, n in enumerate(sections):
        if n > size + (k < extra):
            raise ValueError(f"--flags: --timestep_respacing {v!r}: cannot divide a section of "
                             f"{size + (k < extra)} steps into {n}")
    if len(sections) > 1:
        return f"{what}, spaced evenly over all {T} (one section, not {len(sections)})"
    return f"{what} (--steps {sections[0]} visits the timesteps ADM's {v!r} visits)"


def _check_widths(p: AdmPreset, where: str) -> None:
    """Refuse what ADM itself cannot build: a width that is not a multiple of GroupNorm's 32 groups, an attention
    width the heads do not divide, a side the levels do not halve exactly."""
    widths = [int(m * p.model_channels) for m in p.channel_mult]
    for w, m in zip(widths, p.channel_mult):
        if w <= 0 or w % 32:
            raise ValueError(f"--flags: {where} x channel_mult {m:g} is {w} channels, not a positive multiple of 32 "
                             f"(ADM's GroupNorm has 32 groups)")
    levels = len(widths) - 1
    if p.image_size % 2 ** levels:
        raise ValueError(f"--flags: --image_size {p.image_size} cannot be halved {levels} times exactly "
                         f"({len(widths)} levels of channel_mult)")
    attended = [w for level, w in enumerate(widths) if 2 ** level in p.attention_ds] + [widths[-1]]  # + the middle
    if p.kind == "classifier":
        attended.append(widths[-1])  # the attention pool: widths[-1] / 64 heads
    for w in attended:
        if p.num_head_channels != -1 and w % p.num_head_channels:
            raise ValueError(f"--flags: attention over {w} channels cannot have heads of {p.num_head_channels} "
                             f"channels (ADM asserts channels % num_head_channels == 0)")
        if p.num_head_channels == -1 and w % p.num_heads:
            raise ValueError(f"--flags: attention over {w} channels cannot be split into --num_heads {p.num_heads}")


def _diffusion_preset(v: dict, codebase: str) -> tuple:
    """(AdmPreset, notes) of resolved model and diffusion flags."""
    notes = []
    if v["predict_xstart"]:
        raise ValueError("--flags: --predict_xstart True is not supported (the converter and the samplers take "
                         "eps-prediction models only)")
    if v["noise_schedule"] not in ("linear", "cosine"):
        raise ValueError(f"--flags: --noise_schedule {v['noise_schedule']!r}: ADM knows linear and cosine")
    for name in ("image_size", "num_channels", "num_res_blocks", "num_heads"):
        if v[name] < 1:
            raise ValueError(f"--flags: --{name} {v[name]}: must be at least 1")
    T = v["diffusion_steps"]
    if T < 2 or (v["noise_schedule"] == "linear" and T < 20):
        raise ValueError(f"--flags: --diffusion_steps {T}: too few (at least 2; 20 for the linear schedule, whose "
                         f"last beta is 0.02 * 1000 / T)")
    if not 0 <= v["dropout"] < 1:
        raise ValueError(f"--flags: --dropout {v['dropout']}: must be in [0, 1)")
    head_channels = v.get("num_head_channels", -1)
    if head_channels == 0 or head_channels < -1:
        raise ValueError(f"--flags: --num_head_channels {head_channels}: must be -1 (use --num_heads) or positive")
    up = v["num_heads_upsample"]
    if up == 0 or up < -1:
        raise ValueError(f"--flags: --num_heads_upsample {up}: must be -1 (as --num_heads) or positive")
    if head_channels == -1 and up not in (-1, v["num_heads"]):
        raise ValueError(f"--flags: --num_heads_upsample {up} differs from --num_heads {v['num_heads']}: not "
                         f"supported (every attention block is converted with one head count)")
    size = v["image_size"]
    if v.get("channel_mult"):
        mult = _int_list("channel_mult", v["channel_mult"])
    elif size in _CHANNEL_MULT[codebase]:
        mult = _CHANNEL_MULT[codebase][size]
    else:
        sizes = ", ".join(str(k) for k in _CHANNEL_MULT[codebase])
        give = "give --channel_mult" if codebase == "guided" else "improved-diffusion has no --channel_mult flag"
        raise ValueError(f"--flags: --image_size {size}: {CODEBASES[codebase]} has no default channel_mult for it "
                         f"(it has one for {sizes}; {give})")
    p = AdmPreset(FLAGS_NAME, "diffusion", size, v["num_channels"], v["num_res_blocks"], mult,
                  _int_list("attention_resolutions", v["attention_resolutions"]), num_heads=v["num_heads"],
                  num_head_channels=head_channels, use_scale_shift_norm=v["use_scale_shift_norm"],
                  resblock_updown=v.get("resblock_updown", False),
                  new_attention_order=v.get("use_new_attention_order", False),
                  num_classes=NUM_CLASSES if v["class_cond"] else 0, out_channels=6 if v["learn_sigma"] else 3,
                  schedule=v["noise_schedule"], T=T, rescale_timesteps=v["rescale_timesteps"],
                  sigma_small=v.get("sigma_small", False), source=f"--flags ({CODEBASES[codebase]})")
    _check_widths(p, f"--num_channels {p.model_channels}")
    if v["timestep_respacing"]:
        notes.append(_respacing_note(v["timestep_respacing"], T))
    return p, notes


def _classifier_preset(v: dict) -> tuple:
    """(AdmPreset, notes) of resolved classifier flags: guided-diffusion's create_classifier (64-channel heads,
    channel_mult from the image size), with minority-guidance's latent_size / in_channels / out_channels."""
    notes = []
    size = v["latent_size"] if v["latent_size"] is not None else v["image_size"]
    for name, value in (("image_size" if v["latent_size"] is None else "latent_size", size),
                        ("classifier_width", v["classifier_width"]), ("classifier_depth", v["classifier_depth"]),
                        ("in_channels", v["in_channels"]), ("out_channels", v["out_channels"])):
        if value < 1:
            raise ValueError(f"--flags: --{name} {value}: must be at least 1")
    if v["classifier_pool"] not in _POOLS:
        raise ValueError(f"--flags: --classifier_pool {v['classifier_pool']!r}: ADM's pools are {', '.join(_POOLS)}")
    if v["classifier_pool"] != "attention":
        raise ValueError(f"--flags: --classifier_pool {v['classifier_pool']} is not supported (only attention "
                         f"pooling, which every released classifier uses)")
    if size not in _CHANNEL_MULT["classifier"]:
        sizes = ", ".join(str(k) for k in _CHANNEL_MULT["classifier"])
        raise ValueError(f"--flags: --image_size {size}: guided-diffusion's classifier has no channel_mult for it "
                         f"(it has one for {sizes})")
    p = AdmPreset(FLAGS_NAME, "classifier", size, v["classifier_width"], v["classifier_depth"],
                  _CHANNEL_MULT["classifier"][size],
                  _int_list("classifier_attention_resolutions", v["classifier_attention_resolutions"]),
                  num_head_channels=64, use_scale_shift_norm=v["classifier_use_scale_shift_norm"],
                  resblock_updown=v["classifier_resblock_updown"], in_channels=v["in_channels"],
                  out_channels=v["out_channels"], source="--flags (guided-diffusion classifier)")
    _check_widths(p, f"--classifier_width {p.model_channels}")
    if v["timestep_respacing"]:
        notes.append(_respacing_note(v["timestep_respacing"], v["diffusion_steps"]))
    if v["classifier_scale"] != CLASSIFIER_FLAG_DEFAULTS["classifier_scale"]:
        notes.append(f"--classifier_scale {v['classifier_scale']:g} recorded; the guidance scale is sample's --scale")
    return p, notes


def _structure(p: AdmPreset) -> tuple:
    """What decides the converted model and how it samples; names, sources and the flags' spelling do not
    (attention resolutions count as the downsample rates they give, heads as the count or width in force)."""
    heads = ("channels", p.num_head_channels) if p.num_head_channels != -1 else ("count", p.num_heads)
    common = (p.kind, p.image_size, p.model_channels, p.num_res_blocks, tuple(float(m) for m in p.channel_mult),
              frozenset(p.attention_ds), heads, p.use_scale_shift_norm, p.resblock_updown, p.new_attention_order,
              p.in_channels, p.out_channels)
    if p.kind == "classifier":
        return common
    return common + (p.num_classes, p.schedule, p.T, p.rescale_timesteps, variance_type(p))


def same_model(a: AdmPreset, b: AdmPreset) -> bool:
    """Whether two presets give the same layout, the same converted network and the same sampling semantics."""
    return _structure(a) == _structure(b)


def parse_flags(text: str, kind: str = "diffusion", codebase: str = "guided") -> ParsedFlags:
    """A guided-diffusion / improved-diffusion MODEL_FLAGS (+ DIFFUSION_FLAGS) string (``kind`` 'diffusion') or a
    CLASSIFIER_FLAGS string (``kind`` 'classifier', guided-diffusion's) as a preset, with the codebase's own
    defaults for every absent flag. Attention resolutions are image resolutions (downsample rate = image_size //
    r), as ADM reads them. A released preset is returned when the flags describe exactly its model. One
    ValueError line naming the flag for an unknown, repeated-differently or malformed flag, and for what the
    converter cannot honour (predict_xstart, a pool other than attention, per-direction head counts) or ADM
    itself would not build."""
    if kind not in ("diffusion", "classifier"):
        raise ValueError(f"unknown kind {kind!r}; allowed: diffusion, classifier")
    if kind == "diffusion" and codebase not in CODEBASES:
        raise ValueError(f"unknown --codebase {codebase!r}; allowed: {', '.join(CODEBASES)}")
    if kind == "classifier":
        codebase = "guided"
    defaults = FLAG_DEFAULTS[codebase] if kind == "diffusion" else CLASSIFIER_FLAG_DEFAULTS
    values, given = _read_flags(text, defaults, kind, codebase)
    p, notes = _diffusion_preset(values, codebase) if kind == "diffusion" else _classifier_preset(values)
    match = next((q for q in PRESETS.values() if same_model(q, p)), None)
    return ParsedFlags(match or p, codebase, " ".join(text.split()), values, given, tuple(notes))


def matching_presets(p: AdmPreset) -> list:
    """Every released preset with ``p``'s model (the LSUN bedroom, cat and horse models share one)."""
    return [q for q in PRESETS.values() if same_model(q, p)]


def preset_flags(p: AdmPreset) -> tuple:
    """(codebase, flags string) that ``parse_flags`` turns into ``p``'s model: every structural flag written out
    (channel_mult only where it is not the image size's default, which is how the 512 model's 0.5 is given),
    improved-diffusion's flags for its releases, guided-diffusion's otherwise; ValueError for a preset no flags
    string of those codebases describes."""
    def b(x):
        return "True" if x else "False"

    def res(r):
        return ",".join(str(x) for x in r)

    if p.kind == "classifier":
        if p.channel_mult != _CHANNEL_MULT["classifier"].get(p.image_size) or p.num_head_channels != 64 \
                or p.new_attention_order:
            raise ValueError(f"preset {p.name}: no classifier flags describe it")
        flags = [f"--image_size {p.image_size}", f"--classifier_width {p.model_channels}",
                 f"--classifier_depth {p.num_res_blocks}",
                 f"--classifier_attention_resolutions {res(p.attention_resolutions)}",
                 f"--classifier_use_scale_shift_norm {b(p.use_scale_shift_norm)}",
                 f"--classifier_resblock_updown {b(p.resblock_updown)}", "--classifier_pool attention"]
        if (p.in_channels, p.out_channels) != (3, 1000):  # minority-guidance's head
            flags += [f"--in_channels {p.in_channels}", f"--out_channels {p.out_channels}"]
        return "guided", " ".join(flags)
    codebase = "improved" if p.source.startswith(CODEBASES["improved"]) else "guided"
    default_mult = _CHANNEL_MULT[codebase].get(p.image_size)
    if p.in_channels != 3 or p.num_classes not in (0, NUM_CLASSES) or p.out_channels not in (3, 6) or (
            codebase == "improved" and (p.resblock_updown or p.new_attention_order or p.num_head_channels != -1
                                        or p.channel_mult != default_mult)) or (
            codebase == "guided" and p.sigma_small and p.out_channels == 3):
        raise ValueError(f"preset {p.name}: no {CODEBASES[codebase]} flags describe it")
    flags = [f"--attention_resolutions {res(p.attention_resolutions)}"]
    if p.channel_mult != default_mult:
        if any(m != int(m) for m in p.channel_mult):
            raise ValueError(f"preset {p.name}: channel_mult {p.channel_mult} is not integers and not the default")
        flags.append(f"--channel_mult {','.join(str(int(m)) for m in p.channel_mult)}")
    flags += [f"--class_cond {b(p.num_classes)}", f"--diffusion_steps {p.T}", f"--image_size {p.image_size}",
              f"--learn_sigma {b(p.out_channels == 6)}", f"--noise_schedule {p.schedule}",
              f"--num_channels {p.model_channels}"]
    flags.append(f"--num_head_channels {p.num_head_channels}" if p.num_head_channels != -1
                 else f"--num_heads {p.num_heads}")
    flags.append(f"--num_res_blocks {p.num_res_blocks}")
    if codebase == "guided":
        flags.append(f"--resblock_updown {b(p.resblock_updown)}")
    flags.append(f"--rescale_timesteps {b(p.rescale_timesteps)}")
    if codebase == "improved" and p.sigma_small:
        flags.append("--sigma_small True")
    if codebase == "guided":
        flags.append(f"--use_new_attention_order {b(p.new_attention_order)}")
    flags.append(f"--use_scale_shift_norm {b(p.use_scale_shift_norm)}")
    return codebase, " ".join(flags)
