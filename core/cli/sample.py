"""sample: the guidance and initialisation terms a command line asks for, and the sampling run."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from core.maths.score import make_distance
from core.cli.common import _accelerator, _bar, _positive


# ----------------------------------------------------------------------------------------------
# sample
# ----------------------------------------------------------------------------------------------
METHODS = ("standard", "minority", "mixture", "self-guided", "boost-skip")
# Each method's default sampler is its paper's and official code's: ancestral (minority guidance: the paper's
# Table 2, 250 respaced steps; sg-minority's and Boost-and-Skip's scripts too). DDIM is a flag.
DEFAULT_SAMPLER = "ddpm"
# diffusers' schedulers (issue 26): the solvers' own papers' step counts for guided sampling (DPM-Solver++ reports
# 15-20 for classifier guidance); what each costs on our bundles is measured in docs/RESULTS.md
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "dpmpp-2m": 20, "dpmpp-2m-sde": 20, "unipc": 20, "euler-a": 50,
                 "diffusers-ddim": 50, "diffusers-ddpm": 250}
ANCESTRAL_METHODS = ("self-guided", "boost-skip")  # DDIM breaks them (docs/RESULTS.md): a bundle's app.sampler
# does not apply to them, as the app switches them to ancestral
METHOD_WORDS = {"standard": "standard sampling", "minority": "minority guidance", "mixture": "mixture guidance",
                "self-guided": "self-guided minority sampling", "boost-skip": "Boost-and-Skip"}


def sampler_and_steps(a, app: dict, T: int) -> tuple[str, int, str]:
    """The run's sampler and steps: an explicit --sampler / --steps wins; else the bundle manifest's
    app.sampler (not for self-guided and boost-skip) and app.steps (when recorded for that sampler); else
    ancestral and 250 steps (50 for DDIM), at most T. Returns (sampler, steps, both with their reasons in words)."""
    if a.sampler is not None:
        sampler, why_s = a.sampler, "--sampler"
    elif a.method in ANCESTRAL_METHODS:
        sampler, why_s = DEFAULT_SAMPLER, f"ancestral; default for {a.method}: its official sampler"
    elif app.get("sampler") is not None:
        sampler, why_s = app["sampler"], "the bundle's app.sampler"
    else:
        sampler, why_s = DEFAULT_SAMPLER, "ancestral; default" + (": the paper's" if a.method != "standard" else "")
    if a.steps is not None:
        steps, why_n = a.steps, "--steps"
    elif app.get("steps") is not None and app.get("sampler") in (None, sampler):
        steps, why_n = int(app["steps"]), "the bundle's app.steps"
    else:
        steps, why_n = min(DEFAULT_STEPS[sampler], T), f"default for {sampler}" + (
            f", capped at T = {T}" if DEFAULT_STEPS[sampler] > T else "")
    return sampler, steps, f"sampler {sampler} ({why_s}), {steps} steps ({why_n})"


def target_words(a, L: Optional[int]) -> str:
    """The guidance target in words for the run's first line."""
    if a.method == "mixture":
        return f" over the L = {L} classes' thresholds (Eq. 18)"
    if a.method != "minority":
        return ""
    spec = a.minority_class
    if spec is None:
        return f" toward l = {L - 1} of 0..{L - 1} (the rarest class; default)"
    if spec.strip().lower() == "all":
        return f" toward l ~ U{{0..{L - 1}}} (all classes, seeded)"
    if "-" in spec.strip():
        lo, hi = (int(v) for v in spec.split("-"))
        return f" toward l ~ U{{{lo}..{hi}}} of 0..{L - 1} (seeded)"
    l = int(spec)  # noqa: E741
    which = " (the rarest class)" if l == L - 1 else " (the most common class)" if l == 0 else ""
    return f" toward l = {l} of 0..{L - 1}{which}"


def self_guided_distance(name: str, device, model=None, warn=None):
    """--sg-distance auto: LPIPS-Alex (the official sampler's) when its AlexNet weights are present; else
    unet-feat when the backbone is a UNet2DModel, else l2 (``warn`` is told which fallback was taken)."""
    from core.maths.score import lpips_weights_present

    if name == "auto":
        if lpips_weights_present("alex"):
            name = "lpips-alex"
        else:
            try:
                d = make_distance("unet-feat", device, model=model)
                name = "unet-feat"
            except ValueError:
                d, name = make_distance("l2", device), "l2"
            if warn is not None:
                warn(f"--sg-distance auto: LPIPS-Alex's AlexNet weights are not in the torch hub cache; using {name}")
            return d, name
    return make_distance(name, device, model=model), name


def build_init(a):
    """The initialisation term for --method boost-skip (None otherwise)."""
    from core.maths.sampling import BoostSkip

    if a.method != "boost-skip":
        return None
    if a.gamma <= 0:
        raise ValueError(f"--gamma must be > 0, got {a.gamma}")
    if not 0 <= a.skip < a.steps:
        raise ValueError(f"--skip must be in [0, {a.steps - 1}] for --steps {a.steps}, got {a.skip}")
    return BoostSkip(a.gamma, a.skip)


def build_guidance(a, model, device, warn=None):
    """The guidance for --method as a function of the chunk's minority targets (N,) (None for standard),
    validated against the classifier; classifiers are loaded once."""
    from dataclasses import replace

    from core.maths.guidance import ClassifierGuidance, MixtureGuidance, SelfGuidance, combine, minority_targets
    from core.nets.models import load_classifier

    terms, minority = [], None
    a.minority_targets, a.num_minority_classes = None, None
    if a.method == "self-guided":
        if not 0 < a.p < 1:
            raise ValueError(f"--p must be in (0, 1), got {a.p}")
        if a.interval < 1:
            raise ValueError(f"--interval must be >= 1, got {a.interval}")
        distance, a.sg_distance_used = self_guided_distance(a.sg_distance, device, model, warn)
        terms.append(SelfGuidance(model, a.scale, distance, p=a.p, interval=a.interval, seed=a.seed, clip=a.sg_clip,
                                  count_from=a.sg_count_from, class_labels=a.class_label if model.num_classes else None))
    if a.method in ("minority", "mixture"):
        if not a.classifier:
            raise ValueError(f"--method {a.method} needs --classifier")
        clf = load_classifier(a.classifier, device)
        L = clf.net.cfg.num_outputs
        if clf.net.cfg.num_classes and a.class_label is None:
            raise ValueError("the classifier is class-conditional: pass --class-label")
        if hasattr(clf.net, "precision"):  # our classifier; imported ADM classifiers compute in fp32
            clf.net.precision = a.precision
        a.num_minority_classes = L
        if a.method == "minority":
            a.minority_targets = minority_targets(a.minority_class, a.n, a.seed, L)  # l (default L-1) or U{A..B}
            minority = ClassifierGuidance(clf.net, 0, a.scale, a.class_label if clf.net.cfg.num_classes else None)
            terms.append(minority)
        else:
            th = clf.thresholds
            if isinstance(th, dict):
                if str(a.class_label) not in th:
                    raise ValueError(f"--class-label must be one of {', '.join(sorted(th, key=int))} for this "
                                     f"classifier's per-class thresholds, got {a.class_label}")
                th = th[str(a.class_label)]
            terms.append(MixtureGuidance(clf.net, th, a.scale, a.class_label if clf.net.cfg.num_classes else None))
    if a.extra_classifier:
        extra = load_classifier(a.extra_classifier, device)
        if hasattr(extra.net, "precision"):
            extra.net.precision = a.precision
        k = extra.net.cfg.num_outputs
        if not 0 <= a.extra_class < k:
            raise ValueError(f"--extra-class must be in [0, {k}), got {a.extra_class}")
        cond = extra.net.cfg.num_classes
        if cond and a.class_label is None:
            raise ValueError("the extra classifier is class-conditional: pass --class-label")
        terms.append(ClassifierGuidance(extra.net, a.extra_class, a.extra_scale, a.class_label if cond else None))
    cond_sizes = [t.classifier.cfg.num_classes for t in terms
                  if getattr(getattr(t, "classifier", None), "class_embed", None) is not None]
    if a.class_label is not None and not (model.num_classes or cond_sizes):
        raise ValueError(f"--class-label {a.class_label}: neither the model nor the classifier is class-conditional; "
                         "drop --class-label")
    for k in cond_sizes:
        if a.class_label is not None and not 0 <= a.class_label < k:
            raise ValueError(f"--class-label must be in [0, {k}) for the class-conditional classifier, got {a.class_label}")
    combine(*terms)  # validates the scales once

    def for_targets(targets: Optional[torch.Tensor]):
        live = [replace(t, target=targets.to(device)) if t is minority else t for t in terms]
        return combine(*live)

    return for_targets


def cmd_sample(a) -> int:
    from accelerate.utils import gather_object

    from core.bundles.manifest import validate_manifest
    from core.nets.checkpoint import atomic_write_bytes, read_json
    from core.nets.models import PRECISIONS, effective_precision, load_diffusion
    from core.maths.sampling import SAMPLERS, sample, to_uint8

    _positive("n", a.n)
    if a.steps is not None:
        _positive("steps", a.steps)
    _positive("batch-size", a.batch_size)
    if a.scale < 0:
        raise ValueError(f"--scale must be >= 0, got {a.scale}")
    if not 0 <= a.eta <= 1:
        raise ValueError(f"--eta must be in [0, 1], got {a.eta}")
    if a.method is not None and a.method not in METHODS:
        raise ValueError(f"unknown --method {a.method!r}; allowed: {', '.join(METHODS)}")
    if a.sampler is not None and a.sampler not in SAMPLERS:
        raise ValueError(f"unknown --sampler {a.sampler!r}; allowed: {', '.join(SAMPLERS)}")
    if a.precision not in PRECISIONS:
        raise ValueError(f"unknown --precision {a.precision!r}; allowed: {', '.join(PRECISIONS)}")
    from core.bundles.bundle import resolve

    a.model, a.classifier = resolve(a.bundle, a.model, a.classifier)
    app = {}
    if a.bundle is not None:  # checked (hashes and bounds) by resolve; its app.sampler / app.steps are defaults
        mpath = Path(a.bundle) / "manifest.json"
        app = validate_manifest(read_json(mpath), str(mpath)).get("app") or {}
    if a.method is None:
        a.method = "minority" if a.classifier else "standard"
    acc = _accelerator()
    model = load_diffusion(a.model, acc.device)
    model.precision = a.precision
    a.sampler, a.steps, how = sampler_and_steps(a, app, model.schedule.T)
    if a.steps > model.schedule.T:
        raise ValueError(f"--steps must be in [1, {model.schedule.T}] for this model, got {a.steps}")
    from core.maths.sampling import REFERENCE_SAMPLERS
    from core.maths.solvers import variance_note

    if a.method in ANCESTRAL_METHODS and a.sampler not in REFERENCE_SAMPLERS:
        raise ValueError(f"--method {a.method} is defined for the samplers {', '.join(REFERENCE_SAMPLERS)} (its paper's "
                         f"loop), not for --sampler {a.sampler}")
    init = build_init(a)
    if model.num_classes:
        if a.class_label is None or not 0 <= a.class_label < model.num_classes:
            raise ValueError(f"the model is class-conditional: --class-label must be in [0, {model.num_classes})")
    warnings = []  # said after the run's first line
    guidance_for = build_guidance(a, model, acc.device, warn=warnings.append)
    used = effective_precision(a.precision, acc.device)
    a.precision_used = used
    if acc.is_main_process:  # the run's first line: what is sampled, and each default that was taken
        w = f", w = {a.scale:g}" if a.method in ("minority", "mixture", "self-guided") else \
            f", gamma = {a.gamma:g}, skip = {a.skip}" if a.method == "boost-skip" else ""
        print(f"{METHOD_WORDS[a.method]}{target_words(a, a.num_minority_classes)}{w}; {how}; precision {a.precision}"
              + (f" ({used} on {acc.device.type})" if a.precision == "auto" else "")
              + f"; {a.n} images, seed {a.seed}", file=sys.stderr)
    if init is not None and a.sampler == "ddim" and a.gamma != 1:
        warnings.append("Boost-and-Skip is meant for --sampler ddpm; with deterministic DDIM the boosted variance "
                        "is never removed and images saturate")
    if a.method == "self-guided" and a.sampler == "ddim" and a.scale > 0:
        warnings.append("the official self-guided sampler is ancestral (--sampler ddpm); with DDIM the guidance "
                        "moves x0_hat by (1 - abar_t) / sqrt(abar_t) times the scale, unclipped, at every guided "
                        "step and the images break at scales that work with ddpm (docs/RESULTS.md)")
    note = variance_note(a.sampler, getattr(model, "variance_type", "fixed_small"))
    if note is not None:
        warnings.append(note)
    for m in warnings:
        print(f"warning: {m}", file=sys.stderr)
    chunks = [(k, s, min(a.batch_size, a.n - s)) for k, s in enumerate(range(0, a.n, a.batch_size))]
    steps_run = a.steps - (init.skip if init is not None else 0)
    bar = _bar(len(chunks) * steps_run, f"sample ({a.method}, {a.sampler})", enabled=acc.is_main_process)
    results = []
    with acc.split_between_processes(chunks) as mine:
        for k, start, size in mine:
            g = torch.Generator().manual_seed((a.seed * 1_000_003 + k) % (2 ** 63))  # chunk k: same noise on any process
            targets = a.minority_targets[start:start + size] if a.minority_targets is not None else None
            x = sample(model, size, steps=a.steps, sampler=a.sampler, eta=a.eta, guidance=guidance_for(targets),
                       class_labels=a.class_label if model.num_classes else None, generator=g,
                       callback=lambda s: bar.update(acc.num_processes), init=init)
            results.append((k, to_uint8(x)))
    gathered = gather_object(results)
    bar.close()
    if not acc.is_main_process:
        return 0
    images = np.concatenate([img for _, img in sorted(gathered, key=lambda r: r[0])])
    mc = a.minority_class.strip() if a.minority_class is not None else None
    if mc is None and a.method == "minority":
        mc = str(a.num_minority_classes - 1)  # the default: the rarest class
    settings = {"seed": a.seed, "minority_class": int(mc) if mc is not None and mc.lstrip("-").isdigit() else mc,
                "scale": a.scale, "steps": a.steps, "sampler": a.sampler, "precision": a.precision,
                "precision_used": a.precision_used, "method": a.method, "eta": a.eta, "n": a.n,
                "batch_size": a.batch_size,
                "model": str(a.model), "classifier": str(a.classifier or ""), "class_label": a.class_label,
                "extra_classifier": str(a.extra_classifier or ""), "extra_class": a.extra_class,
                "extra_scale": a.extra_scale}
    if a.minority_targets is not None:
        settings["minority_classes"] = a.minority_targets.tolist()  # each sample's l (a range draws them)
    if a.method == "self-guided":
        settings.update(p=a.p, interval=a.interval, sg_distance=a.sg_distance, sg_distance_used=a.sg_distance_used,
                        sg_clip=a.sg_clip, sg_count_from=a.sg_count_from)
    if a.method == "boost-skip":
        settings.update(gamma=a.gamma, skip=a.skip)
    buf = io.BytesIO()
    np.savez(buf, images=images, settings_json=np.array(json.dumps(settings)),
             **{k: np.array(v if v is not None else -1) for k, v in settings.items() if k in
                ("seed", "minority_class", "scale", "steps", "sampler", "method", "eta")})
    atomic_write_bytes(a.out, buf.getvalue())
    print(f"{images.shape[0]} images {images.shape[1]}x{images.shape[2]}x{images.shape[3]} -> {a.out}", file=sys.stderr)
    return 0
