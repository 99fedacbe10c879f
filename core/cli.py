"""``python -m core <command>``: the pipeline from the command line, with progress bars.

Commands (names and flags are a contract): train-diffusion, score, categorize, train-classifier,
sample, evaluate. Every run also works under ``accelerate launch`` / ``torchrun``: work is split with
accelerate's ``split_between_processes`` and gathered with ``gather_object``; only the main
process writes. Errors in the user's input end the command with one line on stderr and exit 2.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .errors import DataError, MinorityError
from .score import DISTANCES, make_distance, resolve_t

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise SystemExit(_fail(f"{self.prog}: {message}"))


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


def _bar(total: int, desc: str, enabled: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)


def _accelerator():
    from .train import make_accelerator

    return make_accelerator()


def _positive(name: str, value, minimum=1):
    if value < minimum:
        raise ValueError(f"--{name} must be >= {minimum}, got {value}")
    return value


def _ints(name: str, text: str) -> tuple:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--{name} must be comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise ValueError(f"--{name} must be positive integers, got {text!r}")
    return vals


def _widths(text: str) -> tuple:
    vals = _ints("widths", text)
    if min(vals) < 4 or any(v % 4 for v in vals):
        raise ValueError(f"--widths must be positive multiples of 4, got {text!r}")
    return vals


# ----------------------------------------------------------------------------------------------
# train-diffusion
# ----------------------------------------------------------------------------------------------
def cmd_train_diffusion(a) -> int:
    from .models import UNetConfig
    from .train import DiffusionTrainConfig, lr_is_sane, param_count, train_diffusion

    _positive("steps", a.steps)
    _positive("batch-size", a.batch_size)
    _positive("save-every", a.save_every)
    _positive("T", a.T, 2)
    lr_is_sane(a.lr)
    if not 0 <= a.ema_decay < 1:
        raise ValueError(f"--ema-decay must be in [0, 1), got {a.ema_decay}")
    if a.channels not in (1, 3):
        raise ValueError(f"--channels must be 1 or 3, got {a.channels}")
    unet = UNetConfig(image_size=a.size, channels=a.channels, block_out_channels=_widths(a.widths),
                      layers_per_block=a.layers_per_block, attention=not a.no_attention)
    if a.size % (2 ** (len(unet.block_out_channels) - 1)):
        raise ValueError(f"--size {a.size} must be divisible by {2 ** (len(unet.block_out_channels) - 1)} for --widths {a.widths}")
    data = _load_data(a.data, a.size, a.channels, band=a.slice_band)
    cfg = DiffusionTrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, ema_decay=a.ema_decay,
                               schedule=a.schedule, T=a.T, seed=a.seed, save_every=a.save_every,
                               class_cond=a.class_cond, unet=unet)
    bar = _bar(a.steps, "train-diffusion")

    def progress(step, total, m):
        bar.n = step
        bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)
        bar.refresh()

    result = train_diffusion(data, a.out, cfg, resume=a.resume, progress=progress)
    bar.close()
    from .models import build_unet

    print(f"trained {param_count(build_unet(unet))/1e6:.2f}M-parameter UNet for {result['steps']} steps "
          f"on {len(data)} images -> {a.out}/model.safetensors (EMA)", file=sys.stderr)
    return 0


def _band(text: str) -> tuple:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--slice-band must be two fractions LO,HI, got {text!r}") from None
    if not 0 <= lo < hi <= 1:
        raise ValueError(f"--slice-band must satisfy 0 <= LO < HI <= 1, got {text!r}")
    return lo, hi


def _load_data(root: str, size: int, channels: int, quiet: bool = False, band: str = "0.4,0.6"):
    from .data import list_images, load_image_folder

    slice_band = _band(band)
    n = len(list_images(root)[0])
    bar = _bar(n, "load images", enabled=not quiet)

    def progress(i, total):
        bar.n = i
        if i == total or i % 64 == 0:
            bar.refresh()

    data = load_image_folder(root, size, channels, progress=progress, slice_band=slice_band)
    bar.close()
    if data.skipped and not quiet:
        print(f"skipped {len(data.skipped)} unreadable image(s) of {n}:", file=sys.stderr)
        for rel, why in data.skipped[:10]:
            print(f"  {rel}: {why}", file=sys.stderr)
    return data


# ----------------------------------------------------------------------------------------------
# score
# ----------------------------------------------------------------------------------------------
def _resolve_t(t_arg: Optional[float], schedule) -> int:
    return schedule.default_score_t() if t_arg is None else resolve_t(t_arg, schedule.T)


def _sidecar(csv_path: str | Path) -> Path:
    return Path(csv_path).with_suffix(".json")


def write_scores(path: str | Path, paths: list, scores: np.ndarray, labels: Optional[np.ndarray],
                 class_names: Optional[list], class_ids, meta: dict) -> None:
    """scores.csv (path,score,label[,class]) and its JSON sidecar, both atomic."""
    from .checkpoint import atomic_write_json, atomic_write_text

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    header = ["path", "score", "label"] + (["class"] if class_ids is not None else [])
    w.writerow(header)
    for i, p in enumerate(paths):
        row = [p, f"{float(scores[i]):.8g}", "" if labels is None else int(labels[i])]
        if class_ids is not None:
            row.append(class_names[int(class_ids[i])])
        w.writerow(row)
    atomic_write_text(path, buf.getvalue())
    atomic_write_json(_sidecar(path), meta)


@dataclass(frozen=True)
class ScoreTable:
    """A scores.csv read back: rows in file order; class_ids index class_names (None without a class column)."""

    paths: list
    scores: np.ndarray
    class_names: list
    class_ids: Optional[np.ndarray]
    meta: dict


def read_scores(path: str | Path) -> ScoreTable:
    from .checkpoint import read_json

    path = Path(path)
    if not path.is_file():
        raise DataError(f"--scores {path}: no such file")
    meta = read_json(_sidecar(path)) if _sidecar(path).is_file() else {}
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        paths = [r["path"] for r in rows]
        scores = np.array([float(r["score"]) for r in rows], dtype=np.float64)
        class_names, class_ids = [], None
        if rows and "class" in rows[0]:
            class_names = list(meta.get("class_names") or sorted({r["class"] for r in rows}))
            class_ids = np.array([class_names.index(r["class"]) for r in rows])
    except (KeyError, ValueError, TypeError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"--scores {path}: not a score table with columns path,score,label ({e})") from None
    if not rows:
        raise DataError(f"--scores {path}: no rows")
    return ScoreTable(paths, scores, class_names, class_ids, meta)


def cmd_score(a) -> int:
    from accelerate.utils import gather_object

    from .categorize import categorize, categorize_per_class, fit_labels
    from .models import load_diffusion
    from .score import ScoreSettings, minority_scores

    _positive("draws", a.draws)
    _positive("batch-size", a.batch_size)
    acc = _accelerator()
    model = load_diffusion(a.model, acc.device)
    settings = ScoreSettings(distance=a.distance, t=_resolve_t(a.t, model.schedule), draws=a.draws, seed=a.seed,
                             clip=not a.no_clip)
    distance = make_distance(a.distance, acc.device, seed=a.seed, model=model)  # fails now, not mid-run
    data = _load_data(a.data, model.image_size, model.channels, quiet=not acc.is_main_process, band=a.slice_band)
    if model.num_classes and data.class_ids is None:
        raise DataError(f"the model is class-conditional ({model.num_classes} classes): --data needs one sub-folder per class")
    if model.num_classes and model.class_names and data.class_names != model.class_names:
        raise DataError(f"--data classes {data.class_names} differ from the model's {model.class_names}")
    # whole batches go to each process, so every image is scored in the same batch as in a single process
    batches = [list(range(s, min(s + a.batch_size, len(data)))) for s in range(0, len(data), a.batch_size)]
    bar = _bar(len(data), "score", enabled=acc.is_main_process)
    with acc.split_between_processes(batches) as my_batches:
        mine = [i for b in my_batches for i in b]
        mine_t = torch.tensor(mine, dtype=torch.long)
        done = 0

        def progress(k, total):
            nonlocal done
            bar.update((k - done) * acc.num_processes)
            done = k

        scores = minority_scores(model, data.images[mine_t], mine_t, settings, distance,
                                 data.class_ids[mine_t] if data.class_ids is not None else None,
                                 batch_size=a.batch_size, progress=progress)
    pairs = gather_object(list(zip(mine, scores.tolist())))
    bar.close()
    if not acc.is_main_process:
        return 0
    full = np.empty(len(data), dtype=np.float64)
    for i, s in pairs:
        full[i] = s
    meta = {"model": str(a.model), "data": str(a.data), "settings": settings.to_dict(),
            "schedule": model.schedule.name, "T": model.schedule.T, "num_images": len(data),
            "skipped": [list(s) for s in data.skipped], "processes": acc.num_processes,
            "class_names": data.class_names, "thresholds": None, "num_classes": None, "per_class": False,
            "slice_band": list(_band(a.slice_band))}
    labels = None
    cls_np = data.class_ids.numpy() if data.class_ids is not None else None
    if a.thresholds:
        meta_src = read_scores_meta(a.thresholds)
        th = meta_src.get("thresholds")
        if th is None:
            raise DataError(f"--thresholds {a.thresholds}: holds no thresholds (categorise first)")
        if isinstance(th, dict):
            labels = categorize_per_class(full, cls_np, {int(k): np.array(v) for k, v in th.items()})
        else:
            labels = categorize(full, np.array(th))
        meta.update(thresholds=th, num_classes=meta_src.get("num_classes"), per_class=isinstance(th, dict))
    elif a.classes:
        th, labels = fit_labels(full, a.classes, cls_np if a.per_class else None)
        meta.update(thresholds=_th_json(th), num_classes=a.classes, per_class=a.per_class)
    write_scores(a.out, data.paths, full, labels, data.class_names, data.class_ids, meta)
    print(f"scored {len(data)} images ({settings.distance}, t={settings.t}, {settings.draws} draws) -> {a.out}"
          + (f"; skipped {len(data.skipped)}" if data.skipped else ""), file=sys.stderr)
    return 0


def read_scores_meta(path: str) -> dict:
    from .checkpoint import read_json

    p = Path(path)
    return read_json(p if p.suffix == ".json" else _sidecar(p))


def _th_json(th):
    return {str(k): v.tolist() for k, v in th.items()} if isinstance(th, dict) else th.tolist()


# ----------------------------------------------------------------------------------------------
# categorize / train-classifier
# ----------------------------------------------------------------------------------------------
def _categorize_file(scores_path: str, num_classes: int, per_class: bool):
    """Fit thresholds on a score table and write its labels back (atomic). Returns (table, labels, thresholds)."""
    from .categorize import fit_labels

    table = read_scores(scores_path)
    if per_class and table.class_ids is None:
        raise DataError(f"--per-class needs a 'class' column in {scores_path} (score a folder with one sub-folder per class)")
    th, labels = fit_labels(table.scores, num_classes, table.class_ids if per_class else None)
    meta = {**table.meta, "thresholds": _th_json(th), "num_classes": num_classes, "per_class": per_class}
    write_scores(scores_path, table.paths, table.scores, labels, table.class_names, table.class_ids, meta)
    return table, labels, _th_json(th)


def cmd_categorize(a) -> int:
    table, labels, _ = _categorize_file(a.scores, a.classes, a.per_class)
    counts = np.bincount(labels, minlength=a.classes)
    print(f"{len(table.paths)} scores -> {a.classes} classes (sizes {counts.min()}..{counts.max()}) written to {a.scores}",
          file=sys.stderr)
    return 0


def cmd_train_classifier(a) -> int:
    from .models import ClassifierConfig, load_diffusion
    from .train import ClassifierTrainConfig, lr_is_sane, param_count, train_classifier

    _positive("steps", a.steps)
    _positive("classes", a.classes, 2)
    _positive("batch-size", a.batch_size)
    _positive("eval-every", a.eval_every)
    _positive("base-channels", a.base_channels, 4)
    if not 0 <= a.holdout < 1:
        raise ValueError(f"--holdout must be in [0, 1), got {a.holdout}")
    lr_is_sane(a.lr)
    model = load_diffusion(a.model, "cpu")
    table, labels, th = _categorize_file(a.scores, a.classes, a.per_class)
    paths, meta = table.paths, table.meta
    data = _load_data(a.data, model.image_size, model.channels, band=a.slice_band)
    row = {p: i for i, p in enumerate(paths)}
    keep = [i for i, p in enumerate(data.paths) if p in row]
    if not keep:
        raise DataError(f"no image of --data {a.data} appears in --scores {a.scores} (paths are relative to the data folder)")
    if len(keep) < len(data):
        print(f"{len(data) - len(keep)} image(s) of --data are not in --scores and are left out", file=sys.stderr)
    from dataclasses import replace

    sel = torch.tensor(keep, dtype=torch.long)
    data = replace(data, paths=[data.paths[i] for i in keep], images=data.images[sel],
                   class_ids=data.class_ids[sel] if data.class_ids is not None else None)
    y = np.array([labels[row[p]] for p in data.paths])
    net_cfg = ClassifierConfig(image_size=model.image_size, channels=model.channels, num_outputs=a.classes,
                               base_channels=a.base_channels, channel_mult=_ints("channel-mult", a.channel_mult),
                               num_res_blocks=a.res_blocks)
    cfg = ClassifierTrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay,
                                holdout=a.holdout, eval_every=a.eval_every, seed=a.seed, net=net_cfg)
    class_cond = a.per_class or bool(model.num_classes)
    if class_cond and data.class_ids is None:
        raise DataError("a class-conditional classifier needs --data with one sub-folder per class")
    bar = _bar(a.steps, "train-classifier")

    def progress(step, total, m):
        bar.n = step
        post = {"loss": f"{m['loss']:.3f}"}
        if "val_acc" in m:
            post.update(val_acc=f"{m['val_acc']:.3f}", val_mae=f"{m['val_mae']:.2f}")
        bar.set_postfix(post, refresh=False)
        bar.refresh()

    extra = {"model": str(a.model), "scores": str(a.scores), "score_settings": meta.get("settings"),
             "num_classes_L": a.classes, "per_class": a.per_class}
    result = train_classifier(data, y, model.schedule, a.out, cfg, th, extra, class_cond=class_cond, progress=progress)
    bar.close()
    m = result["metrics"]
    from .models import NoiseConditionedClassifier

    print(f"classifier ({param_count(NoiseConditionedClassifier(net_cfg))/1e6:.2f}M params) -> {a.out}; held-out "
          f"acc {m.get('val_acc', float('nan')):.3f} (chance {1/a.classes:.3f}), mean |class error| "
          f"{m.get('val_mae', float('nan')):.2f}; with t < T/4: acc {m.get('val_acc_low_t', float('nan')):.3f}, "
          f"mean |class error| {m.get('val_mae_low_t', float('nan')):.2f}; Spearman(expected class, class) "
          f"{m.get('val_rank_corr', float('nan')):+.3f}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------
# sample
# ----------------------------------------------------------------------------------------------
METHODS = ("standard", "minority", "mixture", "self-guided", "boost-skip")


def self_guided_distance(name: str, device, model=None, warn=None):
    """--sg-distance auto: LPIPS-Alex (the official sampler's) when its AlexNet weights are present; else
    unet-feat when the backbone is a UNet2DModel, else l2 (``warn`` is told which fallback was taken)."""
    from .score import lpips_weights_present

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
    from .sampling import BoostSkip

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

    from .guidance import ClassifierGuidance, MixtureGuidance, SelfGuidance, combine, minority_targets
    from .models import load_classifier

    terms, minority = [], None
    a.minority_targets = None
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
        if a.method == "minority":
            a.minority_targets = minority_targets(a.minority_class, a.n, a.seed, L)  # l, or l ~ U{A..B}
            minority = ClassifierGuidance(clf.net, 0, a.scale, a.class_label if clf.net.cfg.num_classes else None)
            terms.append(minority)
        else:
            th = clf.thresholds
            if isinstance(th, dict):
                th = th[str(a.class_label)]
            terms.append(MixtureGuidance(clf.net, th, a.scale, a.class_label if clf.net.cfg.num_classes else None))
    if a.extra_classifier:
        extra = load_classifier(a.extra_classifier, device)
        k = extra.net.cfg.num_outputs
        if not 0 <= a.extra_class < k:
            raise ValueError(f"--extra-class must be in [0, {k}), got {a.extra_class}")
        cond = extra.net.cfg.num_classes
        if cond and a.class_label is None:
            raise ValueError("the extra classifier is class-conditional: pass --class-label")
        terms.append(ClassifierGuidance(extra.net, a.extra_class, a.extra_scale, a.class_label if cond else None))
    combine(*terms)  # validates the scales once

    def for_targets(targets: Optional[torch.Tensor]):
        live = [replace(t, target=targets.to(device)) if t is minority else t for t in terms]
        return combine(*live)

    return for_targets


def cmd_sample(a) -> int:
    from accelerate.utils import gather_object

    from .checkpoint import atomic_write_bytes
    from .models import load_diffusion
    from .sampling import SAMPLERS, sample, to_uint8

    _positive("n", a.n)
    _positive("steps", a.steps)
    _positive("batch-size", a.batch_size)
    if a.scale < 0:
        raise ValueError(f"--scale must be >= 0, got {a.scale}")
    if not 0 <= a.eta <= 1:
        raise ValueError(f"--eta must be in [0, 1], got {a.eta}")
    if a.method is not None and a.method not in METHODS:
        raise ValueError(f"unknown --method {a.method!r}; allowed: {', '.join(METHODS)}")
    if a.sampler not in SAMPLERS:
        raise ValueError(f"unknown --sampler {a.sampler!r}; allowed: {', '.join(SAMPLERS)}")
    from .bundle import resolve

    a.model, a.classifier = resolve(a.bundle, a.model, a.classifier)
    if a.method is None:
        a.method = "minority" if a.classifier else "standard"
    init = build_init(a)
    if init is not None and a.sampler == "ddim" and a.gamma != 1:
        print("warning: Boost-and-Skip is meant for --sampler ddpm; with deterministic DDIM the boosted variance "
              "is never removed and images saturate", file=sys.stderr)
    acc = _accelerator()
    model = load_diffusion(a.model, acc.device)
    if a.steps > model.schedule.T:
        raise ValueError(f"--steps must be in [1, {model.schedule.T}] for this model, got {a.steps}")
    if model.num_classes:
        if a.class_label is None or not 0 <= a.class_label < model.num_classes:
            raise ValueError(f"the model is class-conditional: --class-label must be in [0, {model.num_classes})")
    guidance_for = build_guidance(a, model, acc.device, warn=lambda m: print(f"warning: {m}", file=sys.stderr))
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
    mc = a.minority_class.strip()
    settings = {"seed": a.seed, "minority_class": int(mc) if mc.lstrip("-").isdigit() else mc, "scale": a.scale, "steps": a.steps,
                "sampler": a.sampler, "method": a.method, "eta": a.eta, "n": a.n, "batch_size": a.batch_size,
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


# ----------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------
def cmd_evaluate(a) -> int:
    from .evaluate import (PROTOCOLS, EvalSettings, check_sets, evaluate_features, load_image_set, paper_spaces,
                           write_report)
    from .metrics import FEATURES, extract_features, make_extractor

    _positive("batch-size", a.batch_size)
    if a.protocol not in PROTOCOLS:
        raise ValueError(f"unknown --protocol {a.protocol!r}; allowed: {', '.join(PROTOCOLS)}")
    if a.protocol == "paper" and a.features is not None:
        raise ValueError("--protocol paper chooses its own feature spaces; drop --features (or use --protocol single)")
    if a.protocol == "single" and a.quality_features is not None:
        raise ValueError("--quality-features is for --protocol paper")
    for flag, name in (("--features", a.features), ("--quality-features", a.quality_features)):
        if name is not None and name not in FEATURES:
            raise ValueError(f"unknown {flag} {name!r}; allowed: {', '.join(FEATURES)}")
    if len({Path(g).stem for g in a.generated}) != len(a.generated):
        raise ValueError("--generated: two sets have the same file name; their report rows would collide")
    generated = {}
    for g in a.generated:
        generated[Path(g).stem], _ = load_image_set(g)
    first = next(iter(generated.values()))
    if a.protocol == "paper":
        density_name, quality_name = paper_spaces(first.shape[3], a.quality_features)
    else:
        density_name, quality_name = a.features or "resnet50-random", None
    settings = EvalSettings(features=density_name, quality_features=quality_name, baseline_top=a.baseline_top,
                            seed=a.seed)
    bars = []  # a bar only when a folder is decoded

    def loading(i, n):
        if not bars:
            bars.append(_bar(n, "load real"))
        bars[0].update(i - bars[0].n)

    real, real_info = load_image_set(a.real, size=first.shape[1], channels=first.shape[3], progress=loading)
    for b in bars:
        b.close()
    check_sets(real, generated)
    classifier = None
    if "classifier" in (density_name, quality_name):
        from .bundle import resolve
        from .models import load_classifier

        path = a.classifier or (resolve(a.real, None, None)[1] if real_info["kind"] == "bundle" else None)
        classifier = load_classifier(path, "cpu") if path else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    extractors = [make_extractor(n, device=device, seed=a.seed, classifier=classifier, image_size=a.image_size)
                  for n in ([density_name] + ([quality_name] if quality_name else []))]  # all fail before any work

    def feats(extractor, name, images):
        bar = _bar(images.shape[0], f"features {name} ({extractor.name})")
        out = extract_features(extractor, images, a.batch_size, device, lambda i, n: bar.update(i - bar.n))
        bar.close()
        return out

    spaces = [(feats(ex, "real", real), {name: feats(ex, name, images) for name, images in generated.items()})
              for ex in extractors]
    report = evaluate_features(*spaces[0], settings, progress=lambda s: print(s, file=sys.stderr),
                               quality=spaces[1] if len(spaces) > 1 else None)
    extra = {"real": str(a.real), "generated": [str(g) for g in a.generated], "protocol": a.protocol,
             "extractor": extractors[0].info, "real_loaded_as": real_info}
    if len(extractors) > 1:
        extra["quality_extractor"] = extractors[1].info
    out = write_report(report, a.out, extra)
    print(Path(out / "report.md").read_text(encoding="utf-8"), file=sys.stderr)
    print(f"report -> {out}/report.json, report.md, density.png", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def cmd_data_mri_phantom(a) -> int:
    from .phantom import build_mri_phantom

    _positive("n", a.n)
    bar = _bar(a.n, "mri-phantom")

    def progress(i, total):
        bar.n = i
        if i == total or i % 100 == 0:
            bar.refresh()

    out = build_mri_phantom(a.out, n=a.n, size=a.size, seed=a.seed, progress=progress)
    bar.close()
    print(f"{a.n} slices {a.size}x{a.size} -> {out}/images, ground truth in {out}/metadata.csv", file=sys.stderr)
    return 0


def cmd_build_demo(a) -> int:
    from .demo import DemoConfig, build_demo

    for name in ("n", "diffusion_steps", "clf_steps", "draws", "sweep_n"):
        _positive(name.replace("_", "-"), getattr(a, name))
    _positive("classes", a.classes, 2)
    cfg = DemoConfig(n=a.n, size=a.size, seed=a.seed, diffusion_steps=a.diffusion_steps, widths=_widths(a.widths),
                     sweep_n=a.sweep_n, draws=a.draws, classes=a.classes, clf_steps=a.clf_steps,
                     clf_base_channels=a.clf_base_channels, map_method=a.map, score_distance=a.score_distance,
                     score_t=a.score_t)
    # fail before hours of work, not after: a bad timestep, or lpips without its VGG weights offline
    if a.score_t is not None:
        from .train import DiffusionTrainConfig

        resolve_t(a.score_t, DiffusionTrainConfig().T, "--score-t")  # build-demo trains with the default T
    if a.score_distance is not None and a.score_distance != "unet-feat":  # unet-feat needs only the model
        make_distance(a.score_distance)
    work = a.work or f"{a.out.rstrip('/')}.work"
    bars: dict = {}

    def progress(stage, i, total, m):
        if stage not in bars:
            for b in bars.values():
                b.close()
            bars.clear()
            bars[stage] = _bar(total, stage)
        bar = bars[stage]
        bar.n = i
        if "loss" in m:
            bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)
        if i == total or i % 10 == 0:
            bar.refresh()

    def log(msg):
        for b in bars.values():
            b.close()
        bars.clear()
        print(msg, file=sys.stderr, flush=True)

    manifest = build_demo(a.out, work, cfg, log, progress)
    log(f"bundle -> {a.out} (score {manifest['score']['distance']} t={manifest['score']['t']}, Spearman vs severity "
        f"{manifest['score']['spearman_vs_severity']:+.3f}; intermediate files in {work})")
    return 0


# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m core", description="Minority score, minority classifier and guided sampling.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    dd = sub.add_parser("data", help="build a built-in data set")
    dsub = dd.add_subparsers(dest="dataset", required=True, parser_class=_Parser)
    mp = dsub.add_parser("mri-phantom", help="long-tailed brain-MRI atrophy slices from nilearn's MNI152 templates")
    mp.add_argument("--out", required=True)
    mp.add_argument("--n", type=int, default=6000)
    mp.add_argument("--size", type=int, default=32)
    mp.add_argument("--seed", type=int, default=0)
    mp.set_defaults(func=cmd_data_mri_phantom)

    bd = sub.add_parser("build-demo", help="the whole pipeline on the MRI phantom, written as a bundle")
    bd.add_argument("--out", required=True, help="bundle folder, e.g. assets/mri-atrophy")
    bd.add_argument("--work", default=None, help="intermediate files (default OUT.work); a rerun resumes from them")
    bd.add_argument("--n", type=int, default=6000)
    bd.add_argument("--size", type=int, default=32)
    bd.add_argument("--seed", type=int, default=0)
    bd.add_argument("--diffusion-steps", type=int, default=8000)
    bd.add_argument("--widths", default="32,64,64")
    bd.add_argument("--sweep-n", type=int, default=600)
    bd.add_argument("--draws", type=int, default=20, help="noise draws per image for the final score")
    bd.add_argument("--score-distance", choices=list(DISTANCES), default=None,
                    help="distance of the final score (default: the sweep's best)")
    bd.add_argument("--score-t", type=float, default=None,
                    help="timestep of the final score, a fraction of T or an integer step (default: the sweep's best)")
    bd.add_argument("--classes", type=int, default=50)
    bd.add_argument("--clf-steps", type=int, default=6000)
    bd.add_argument("--clf-base-channels", type=int, default=16)
    bd.add_argument("--map", choices=["umap", "pca"], default="umap", help="2-D map of the real data")
    bd.set_defaults(func=cmd_build_demo)

    d = sub.add_parser("train-diffusion", help="train a small UNet2DModel (eps objective, EMA weights)")
    d.add_argument("--data", required=True, help="image folder (sub-folders = classes for --class-cond)")
    d.add_argument("--slice-band", default="0.4,0.6", help="NIfTI volumes: axial slices from this z fraction LO,HI")
    d.add_argument("--out", required=True, help="run folder: model.safetensors + model.json")
    d.add_argument("--size", type=int, default=32)
    d.add_argument("--channels", type=int, default=1, help="1 (grey) or 3 (RGB)")
    d.add_argument("--steps", type=int, default=2000)
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--lr", type=float, default=2e-4)
    d.add_argument("--ema-decay", type=float, default=0.999)
    d.add_argument("--schedule", choices=["linear", "cosine"], default="linear")
    d.add_argument("--T", type=int, default=1000)
    d.add_argument("--widths", default="32,64,64", help="UNet channels per level, e.g. 32,64,64")
    d.add_argument("--layers-per-block", type=int, default=1)
    d.add_argument("--no-attention", action="store_true")
    d.add_argument("--class-cond", action="store_true", help="condition on the data folder's classes")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--save-every", type=int, default=500)
    d.add_argument("--resume", action="store_true", help="continue from OUT/train_state.safetensors")
    d.set_defaults(func=cmd_train_diffusion)

    s = sub.add_parser("score", help="minority score (Eq. 7) of every image of a folder")
    s.add_argument("--model", required=True, help="run folder, diffusers UNet2DModel folder, or hub id")
    s.add_argument("--data", required=True)
    s.add_argument("--slice-band", default="0.4,0.6", help="NIfTI volumes: axial slices from this z fraction LO,HI")
    s.add_argument("--out", required=True, help="scores.csv (a .json sidecar is written beside it)")
    s.add_argument("--distance", choices=list(DISTANCES), default="lpips")
    s.add_argument("--t", type=float, default=None, help="fraction of T in (0,1) or integer timestep; default 0.9T cosine, 0.6T linear")
    s.add_argument("--draws", type=int, default=5)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--classes", type=int, default=0, help="also categorise into L quantile classes")
    s.add_argument("--per-class", action="store_true", help="thresholds within each data class (B.3)")
    s.add_argument("--thresholds", default=None, help="label with the thresholds of an earlier scores.csv/.json")
    s.add_argument("--no-clip", action="store_true", help="do not clip x0_hat to [-1, 1]")
    s.set_defaults(func=cmd_score)

    c = sub.add_parser("categorize", help="quantile classes for a score table (labels written back)")
    c.add_argument("--scores", required=True)
    c.add_argument("--classes", type=int, required=True)
    c.add_argument("--per-class", action="store_true")
    c.set_defaults(func=cmd_categorize)

    k = sub.add_parser("train-classifier", help="train the noise-conditioned minority classifier")
    k.add_argument("--model", required=True)
    k.add_argument("--data", required=True)
    k.add_argument("--slice-band", default="0.4,0.6", help="NIfTI volumes: axial slices from this z fraction LO,HI")
    k.add_argument("--scores", required=True)
    k.add_argument("--classes", type=int, default=50, help="L, the number of ordinal minority classes")
    k.add_argument("--per-class", action="store_true", help="per data class thresholds and a class-conditioned classifier")
    k.add_argument("--steps", type=int, default=2000)
    k.add_argument("--batch-size", type=int, default=64)
    k.add_argument("--lr", type=float, default=3e-4)
    k.add_argument("--weight-decay", type=float, default=0.05)
    k.add_argument("--base-channels", type=int, default=16, help="classifier width (see README: guidance cost)")
    k.add_argument("--channel-mult", default="1,2,2")
    k.add_argument("--res-blocks", type=int, default=1)
    k.add_argument("--holdout", type=float, default=0.1)
    k.add_argument("--eval-every", type=int, default=200)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--out", required=True)
    k.set_defaults(func=cmd_train_classifier)

    m = sub.add_parser("sample", help="draw images, optionally with minority guidance")
    m.add_argument("--model", default=None, help="run folder, diffusers folder or hub id")
    m.add_argument("--bundle", default=None, help="a bundle folder: stands for --model B --classifier B")
    m.add_argument("--classifier", default=None)
    m.add_argument("--method", default=None, help="standard | minority | mixture | self-guided | boost-skip "
                                                  "(default: minority with --classifier, else standard)")
    m.add_argument("--minority-class", default="0", help="target class l in [0, L) (L-1 = rarest), or a range A-B: "
                                                        "each sample's l drawn uniformly from A..B (seeded)")
    m.add_argument("--scale", type=float, default=1.0, help="guidance scale w >= 0 (classifier or self-guided; 0 = standard sampler)")
    m.add_argument("--n", "--num-samples", dest="n", type=int, default=16,
                   help="number of images (write --num-samples under torchrun / accelerate launch, whose own "
                        "parsers take --n for an abbreviation of their flags)")
    m.add_argument("--steps", type=int, default=50)
    m.add_argument("--sampler", default="ddim", help="ddim | ddpm")
    m.add_argument("--eta", type=float, default=0.0, help="DDIM noise level in [0, 1]")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--batch-size", type=int, default=64)
    m.add_argument("--class-label", type=int, default=None, help="data class c for class-conditional models (Eq. 17)")
    m.add_argument("--extra-classifier", default=None, help="a second classifier added on top (Appendix D.9)")
    m.add_argument("--extra-class", type=int, default=0)
    m.add_argument("--extra-scale", type=float, default=1.0)
    m.add_argument("--p", type=float, default=0.8, help="self-guided: re-noising level t' = p T, in (0, 1)")
    m.add_argument("--interval", type=int, default=5, help="self-guided: guide every k-th step")
    m.add_argument("--sg-distance", default="auto", help="self-guided: auto (lpips-alex, the official choice, if "
                                                         "AlexNet's weights are present, else unet-feat, else l2) | "
                                                         + " | ".join(DISTANCES))
    m.add_argument("--sg-clip", action="store_true", help="self-guided: clip x0_hat to [-1, 1] inside the guidance "
                                                          "(the official sampler does not)")
    m.add_argument("--sg-count-from", choices=["last", "first"], default="last",
                   help="self-guided: guide when the respaced step index (0 = last step) is a multiple of --interval "
                        "(last, official) or every k-th step from the first (first)")
    m.add_argument("--gamma", type=float, default=3.0, help="boost-skip: initial noise scale gamma > 0")
    m.add_argument("--skip", type=int, default=3, help="boost-skip: sampler steps skipped at the noisy end")
    m.add_argument("--out", required=True, help="samples.npz")
    m.set_defaults(func=cmd_sample)

    e = sub.add_parser("evaluate", help="AvgkNN, LOF, Rarity, FID, sFID, precision/recall: report.json/.md, density.png")
    e.add_argument("--real", required=True, help="a bundle, an image/NIfTI folder, or a .npz of real images")
    e.add_argument("--generated", required=True, nargs="+", help="one or more .npz written by sample")
    e.add_argument("--out", required=True, help="report folder")
    e.add_argument("--protocol", default="single", help="single: every metric in --features (default); paper: "
                   "density and the baseline in ResNet-50, FID/sFID/precision/recall in Inception-v3 (Section 4.1)")
    e.add_argument("--features", default=None,
                   help="--protocol single's space: resnet50-random (default, offline) | resnet50 | inception | "
                        "inception-fid | inception-random | classifier")
    e.add_argument("--quality-features", default=None,
                   help="--protocol paper: the quality space instead of Inception-v3 as found (e.g. inception-random "
                        "offline)")
    e.add_argument("--baseline-top", type=float, default=0.1,
                   help="quality baseline: the most unique real samples by AvgkNN, a fraction in (0, 1] "
                        "(1.0 = all real data) or a count > 1")
    e.add_argument("--classifier", default=None, help="classifier folder for --features classifier "
                                                     "(default: the bundle's)")
    e.add_argument("--image-size", type=int, default=None, help="network input size (default 224 ResNet, 299 Inception)")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--seed", type=int, default=0, help="seed of the random feature network")
    e.set_defaults(func=cmd_evaluate)
    return p


def main(argv: Optional[list] = None) -> int:
    import os

    os.environ.setdefault("TQDM_MININTERVAL", "0.5")
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else EXIT_USER_ERROR
    except (MinorityError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
        return _fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    except KeyboardInterrupt:
        return _fail("interrupted")
