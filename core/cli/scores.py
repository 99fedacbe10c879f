"""score, and the score table (scores.csv + its JSON sidecar) every later command reads."""
from __future__ import annotations

import csv
import io
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from core.errors import DataError
from core.maths.score import make_distance, resolve_t
from core.cli.common import _accelerator, _band, _bar, _positive, report_skipped


# ----------------------------------------------------------------------------------------------
# score
# ----------------------------------------------------------------------------------------------
def _resolve_t(t_arg: Optional[float], schedule) -> int:
    return schedule.default_score_t() if t_arg is None else resolve_t(t_arg, schedule.T)


def _sidecar(csv_path: str | Path) -> Path:
    return Path(csv_path).with_suffix(".json")


def write_scores(path: str | Path, paths: list, scores: np.ndarray, labels: Optional[np.ndarray],
                 class_names: Optional[list], class_ids, meta: dict, percentile: Optional[np.ndarray] = None) -> None:
    """scores.csv (path,score,label[,class][,percentile]) and its JSON sidecar, both atomic."""
    from core.nets.checkpoint import atomic_write_json, atomic_write_text

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    header = ["path", "score", "label"] + (["class"] if class_ids is not None else []) \
        + (["percentile"] if percentile is not None else [])
    w.writerow(header)
    for i, p in enumerate(paths):
        row = [p, f"{float(scores[i]):.8g}", "" if labels is None else int(labels[i])]
        if class_ids is not None:
            row.append(class_names[int(class_ids[i])])
        if percentile is not None:
            row.append(f"{float(percentile[i]):.2f}")
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
    from core.nets.checkpoint import read_json

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
    from core.maths.categorize import categorize, categorize_per_class, fit_labels
    from core.nets.models import load_diffusion
    from core.maths.score import ScoreSettings

    bundle = None
    if (a.model is None) == (a.bundle is None):
        raise ValueError("give --model (with the score flags) or --bundle (its model, score settings and thresholds)")
    if a.bundle is not None:
        given = [f for f, v in (("--distance", a.distance), ("--t", a.t), ("--draws", a.draws), ("--seed", a.seed),
                                ("--classes", a.classes), ("--thresholds", a.thresholds)) if v is not None]
        if given or a.no_clip or a.per_class:
            raise ValueError(f"--bundle scores with the bundle's own settings and thresholds; drop "
                             f"{', '.join(given) or '--no-clip/--per-class'}")
        from core.bundles.bundle import check_bundle
        from core.bundles.bundle import real_scores as bundle_real_scores

        bundle = check_bundle(a.bundle)
        sc = bundle["score"]
        a.model, a.distance, a.t, a.draws, a.seed = a.bundle, sc["distance"], int(sc["t"]), int(sc["draws"]), int(sc["seed"])
        a.no_clip = not bool(sc.get("clip", True))
    a.distance = a.distance or "lpips"
    a.draws = 5 if a.draws is None else a.draws
    a.seed = 0 if a.seed is None else a.seed
    _positive("draws", a.draws)
    _positive("batch-size", a.batch_size)
    if a.classes is not None:
        _positive("classes", a.classes, 2)  # the same rule as categorize and train-classifier
    acc = _accelerator()
    model = load_diffusion(a.model, acc.device)
    settings = ScoreSettings(distance=a.distance, t=_resolve_t(a.t, model.schedule), draws=a.draws, seed=a.seed,
                             clip=not a.no_clip)
    distance = make_distance(a.distance, acc.device, seed=a.seed, model=model)  # fails now, not mid-run
    from core.bundles.score_parts import merge, prepare, score_source
    from core.bundles.stream import open_source

    _positive("workers", a.workers, 0)
    _positive("chunk", a.chunk)
    source = open_source(a.data, model.image_size, model.channels, _band(a.slice_band), a.image_column,
                         a.label_column, chunk=a.chunk)
    if model.num_classes and not source.columns[1] and not source.class_names:
        raise DataError(f"the model is class-conditional ({model.num_classes} classes): --data needs one sub-folder "
                        f"per class (or a label column)")
    if model.num_classes and model.class_names and source.class_names and source.class_names != model.class_names:
        raise DataError(f"--data classes {source.class_names} differ from the model's {model.class_names}")
    parts = Path(str(a.out) + ".parts")
    run = {"source": source.fingerprint(), "settings": settings.to_dict(), "model": str(a.model),
           "batch_size": a.batch_size}
    if acc.is_main_process:
        done = prepare(parts, run, a.resume)
    acc.wait_for_everyone()
    if not acc.is_main_process:
        from core.bundles.score_parts import done_chunks

        done = done_chunks(parts) if a.resume else set()
    left = sum(c.size for c in source.chunks if c.index not in done)
    if done and acc.is_main_process:
        print(f"resuming: {len(done)} of {len(source.chunks)} chunks already scored in {parts}", file=sys.stderr)
    bar = _bar(left, "score", enabled=acc.is_main_process)
    score_source(model, source, settings, distance, parts, done, acc.process_index, acc.num_processes,
                 a.batch_size, a.workers, progress=lambda k: bar.update(k * acc.num_processes))
    acc.wait_for_everyone()
    bar.close()
    if not acc.is_main_process:
        return 0
    data = merge(parts, source)
    full = data.scores
    report_skipped(data.skipped, source.slots)
    meta = {"model": str(a.model), "data": str(a.data), "settings": settings.to_dict(),
            "schedule": model.schedule.name, "T": model.schedule.T, "num_images": len(data.names),
            "skipped": [list(s) for s in data.skipped], "processes": acc.num_processes,
            "class_names": data.class_names, "thresholds": None, "num_classes": None, "per_class": False,
            "slice_band": list(_band(a.slice_band)), "source": source.kind}
    labels, percentile = None, None
    cls_np = data.class_ids
    if bundle is not None:  # new data under the bundle's thresholds, placed among its real data
        real_scores = np.sort(bundle_real_scores(Path(a.bundle)))  # the scores alone, not the images
        th = bundle["thresholds"]
        labels = categorize(full, np.array(th))
        percentile = 100.0 * np.searchsorted(real_scores, full, side="left") / len(real_scores)
        meta.update(thresholds=th, num_classes=bundle["num_classes"], bundle=str(a.bundle))
    elif a.thresholds:
        meta_src = read_scores_meta(a.thresholds)
        th = meta_src.get("thresholds")
        if th is None:
            raise DataError(f"--thresholds {a.thresholds}: holds no thresholds (categorise first)")
        if isinstance(th, dict):
            labels = categorize_per_class(full, cls_np, {int(k): np.array(v) for k, v in th.items()})
        else:
            labels = categorize(full, np.array(th))
        meta.update(thresholds=th, num_classes=meta_src.get("num_classes"), per_class=isinstance(th, dict))
    elif a.classes is not None:
        th, labels = fit_labels(full, a.classes, cls_np if a.per_class else None)
        meta.update(thresholds=_th_json(th), num_classes=a.classes, per_class=a.per_class)
    write_scores(a.out, data.names, full, labels, data.class_names, data.class_ids, meta, percentile)
    shutil.rmtree(parts, ignore_errors=True)  # the table holds every part now
    print(f"scored {len(data.names)} images ({settings.distance}, t={settings.t}, {settings.draws} draws) -> {a.out}"
          + (f"; skipped {len(data.skipped)}" if data.skipped else ""), file=sys.stderr)
    return 0


def read_scores_meta(path: str) -> dict:
    from core.nets.checkpoint import read_json

    p = Path(path)
    return read_json(p if p.suffix == ".json" else _sidecar(p))


def _th_json(th):
    return {str(k): v.tolist() for k, v in th.items()} if isinstance(th, dict) else th.tolist()
