"""train-diffusion, categorize, train-classifier."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from core.errors import DataError
from core.cli.common import _band, _bar, _ints, _positive, _stream_data, _widths
from core.cli.scores import _th_json, read_scores, write_scores


def cmd_train_diffusion(a) -> int:
    from core.nets.models import UNetConfig
    from core.nets.train import DiffusionTrainConfig, lr_is_sane, param_count, train_diffusion

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
    unet.check_size()
    _positive("cache-mb", a.cache_mb, 0)
    data = _stream_data(a, a.size, a.channels, a.cache_mb)  # read from disk per minibatch (issue 28)
    cfg = DiffusionTrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, ema_decay=a.ema_decay,
                               schedule=a.schedule, T=a.T, seed=a.seed, save_every=a.save_every,
                               class_cond=a.class_cond, unet=unet)
    if a.resume and not (Path(a.out) / "train_state.safetensors").is_file():
        print(f"--resume: no saved state in {a.out} (train_state.safetensors): starting from step 0", file=sys.stderr)
    bar = _bar(a.steps, "train-diffusion")

    def progress(step, total, m):
        bar.n = step
        bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)
        bar.refresh()

    result = train_diffusion(data, a.out, cfg, resume=a.resume, progress=progress)
    bar.close()
    from core.nets.models import build_unet

    print(f"trained {param_count(build_unet(unet))/1e6:.2f}M-parameter UNet for {result['steps']} steps "
          f"on {len(data)} images -> {a.out}/model.safetensors (EMA)", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------
# categorize / train-classifier
# ----------------------------------------------------------------------------------------------
def _categorize_file(scores_path: str, num_classes: int, per_class: bool):
    """Fit thresholds on a score table and write its labels back (atomic). Returns (table, labels, thresholds)."""
    from core.maths.categorize import fit_labels

    table = read_scores(scores_path)
    if per_class and table.class_ids is None:
        raise DataError(f"--per-class needs a 'class' column in {scores_path} (score a folder with one sub-folder per class)")
    th, labels = fit_labels(table.scores, num_classes, table.class_ids if per_class else None)
    meta = {**table.meta, "thresholds": _th_json(th), "num_classes": num_classes, "per_class": per_class}
    write_scores(scores_path, table.paths, table.scores, labels, table.class_names, table.class_ids, meta)
    return table, labels, _th_json(th)


def cmd_categorize(a) -> int:
    _positive("classes", a.classes, 2)
    table, labels, _ = _categorize_file(a.scores, a.classes, a.per_class)
    counts = np.bincount(labels, minlength=a.classes)
    print(f"{len(table.paths)} scores -> {a.classes} classes (sizes {counts.min()}..{counts.max()}) written to {a.scores}",
          file=sys.stderr)
    return 0


def cmd_train_classifier(a) -> int:
    from core.nets.models import ClassifierConfig, load_diffusion
    from core.nets.train import ClassifierTrainConfig, lr_is_sane, param_count, train_classifier

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
    from core.bundles.data import ImageSet
    from core.bundles.random_access import LazyImages, RandomAccess
    from core.bundles.stream import class_names_for, open_source

    _positive("workers", a.workers, 0)
    _positive("chunk", a.chunk)
    _positive("cache-mb", a.cache_mb, 0)
    source = open_source(a.data, model.image_size, model.channels, _band(a.slice_band), a.image_column,
                         a.label_column, chunk=a.chunk)
    access = RandomAccess(source)
    names = access.names()  # the images are decoded when a minibatch draws them, not before (issue 28)
    row = {p: i for i, p in enumerate(paths)}
    keep = np.array([s for s, name in enumerate(names) if name in row], dtype=np.int64)
    if not len(keep):
        raise DataError(f"no image of --data {a.data} appears in --scores {a.scores} (paths are relative to the data "
                        f"folder)")
    if len(keep) < len(names):
        print(f"{len(names) - len(keep)} image(s) of --data are not in --scores (unreadable when scored, or not "
              f"scored) and are left out", file=sys.stderr)
    classes = access.class_ids()
    class_ids = torch.from_numpy(classes[keep]) if classes is not None else None
    class_names = class_names_for(source, classes)
    images = LazyImages(access, keep, cache_bytes=a.cache_mb << 20, threads=max(1, a.workers))
    data = ImageSet(str(a.data), [names[s] for s in keep], images, class_ids, class_names, [],
                    torch.from_numpy(keep))
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
    from core.nets.models import NoiseConditionedClassifier

    print(f"classifier ({param_count(NoiseConditionedClassifier(net_cfg))/1e6:.2f}M params) -> {a.out}; held-out "
          f"acc {m.get('val_acc', float('nan')):.3f} (chance {1/a.classes:.3f}), mean |class error| "
          f"{m.get('val_mae', float('nan')):.2f}; with t < T/4: acc {m.get('val_acc_low_t', float('nan')):.3f}, "
          f"mean |class error| {m.get('val_mae_low_t', float('nan')):.2f}; Spearman(expected class, class) "
          f"{m.get('val_rank_corr', float('nan')):+.3f}", file=sys.stderr)
    return 0
