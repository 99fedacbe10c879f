"""``build``: any image or NIfTI folder (grey or colour) to a bundle the app and every command open.

Stages (each skipped when its output already exists in the work folder, so a killed build resumes;
each redone when the settings it was made with changed):
data (+ metadata.csv) -> diffusion model (trained, or given by --model) -> distance x timestep sweep
against the --truth column (only with --truth) -> minority score of all images -> L quantile classes ->
minority classifier -> 2-D map -> bundle (written into a temp folder beside OUT, then moved in with the
manifest, which names every file's sha256, last). The work folder is tied to its data (``data.json``: a
fingerprint of the decoded images and their paths); the sweep to the model and the truth values; the scores
to the model and settings; the classifier to the scores it was trained on.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from core.bundles.bundle import BUNDLE_FILES, BUNDLE_SCHEMA, MAX_IMAGE_BYTES, sha256_file
from core.bundles.real_set import counter, fit_pca, fit_subset, map_coords, score_streamed, write_pass
from core.nets.checkpoint import (atomic_write_bytes, atomic_write_json, atomic_write_text, commit_folder,
                                  save_tensors_streamed)
from core.bundles.data import DEFAULT_BAND, is_nifti
from core.errors import DataError

Log = Callable[[str], None]
Progress = Callable[[str, int, int, dict], None]
SWEEP_VERSION = 3  # 2: lpips-rand with uniform channel weights (issue 15); 3: tied to model and truth values
# Without --truth the score cannot be chosen by a sweep. unet-feat (at 0.6T of a linear schedule) measured second
# of the five distances on the one data set with ground truth, +0.532 against the fixed lpips-rand's +0.547 (MRI,
# 1500 slices, 16 draws; docs/RESULTS.md, issue 15 §1), needs no weights beyond the model's own, does not depend
# on a random trunk's seed, and works offline; lpips (VGG, the paper's choice) needs torchvision weights a fresh
# machine may not have. Its t is the paper's for the model's schedule (NoiseSchedule.default_score_t, Section C):
# 0.9T cosine, 0.6T linear, where abar_t is about the same (0.024 and 0.026).
DEFAULT_DISTANCE = "unet-feat"
# The sweep's timesteps (fractions of T) per schedule: four points each, so the sweep costs what it did
# (distances x timesteps x 2 draws on --sweep-n images). Linear keeps the grid the shipped bundles were swept
# on: abar 0.66, 0.19, 0.026, 0.0015 (0.9T linear is abar 3e-4, noise only). Cosine spans the same noise
# levels and ends at the paper's 0.9T: abar 0.65, 0.34, 0.093, 0.024 (0.2T cosine is abar 0.90, nearly clean).
SWEEP_T = {"linear": (0.2, 0.4, 0.6, 0.8), "cosine": (0.4, 0.6, 0.8, 0.9)}
MIN_PER_CLASS = 2
RESERVED_COLUMNS = ("path", "score", "label", "x", "y")


@dataclass
class BuildConfig:
    size: Optional[int] = None  # image side; None = 32, or the --model's size
    channels: Optional[int] = None  # 1 grey / 3 RGB; None = 1, or the --model's channels
    seed: int = 0
    model: Optional[str] = None  # run folder, diffusers folder or hub id; None = train one
    diffusion_steps: int = 8000  # UNet optimiser steps (batch 32)
    widths: tuple = (32, 64, 64)  # UNet channels per level
    truth: Optional[str] = None  # metadata.csv column with the ground-truth rarity / severity
    sweep_n: int = 600  # images in the distance / timestep sweep (with --truth)
    sweep_distances: tuple = ("l2", "l1", "ssim", "lpips-rand", "unet-feat")
    sweep_t: Optional[tuple] = None  # fractions of T; None = SWEEP_T of the model's schedule
    draws: int = 20  # noise draws for the final score (5 draws gave a test-retest Spearman of only ~0.6)
    score_distance: Optional[str] = None  # None = the sweep's best (with --truth) or DEFAULT_DISTANCE
    score_t: Optional[float] = None  # fraction of T in (0, 1) or an integer step; None = the sweep's best, or
    # without --truth the paper's t for the model's schedule (0.9T cosine, 0.6T linear)
    classes: int = 50  # L
    clf_steps: int = 6000
    clf_base_channels: int = 16
    clf_batch: int = 64
    map_method: str = "umap"  # umap (PCA 50 then UMAP) or pca (first two components; fast, for tests)
    name: Optional[str] = None  # bundle name; None = the output folder's name
    slice_band: tuple = DEFAULT_BAND
    dataset: dict = field(default_factory=dict)  # extra manifest facts about the data (build-demo: its source)
    force: bool = False  # replace a different bundle already in the output folder
    app_sampler: Optional[str] = None  # the sampler the app (and ``sample --bundle``) starts with for this bundle:
    # one of sampling.SAMPLERS, recorded as the manifest's app.sampler; None records none (the app starts on DDIM,
    # ``sample`` on each method's own default, ancestral)
    app_steps: Optional[int] = None  # its steps (the manifest's app.steps; needs app_sampler)
    workers: int = 0  # DataLoader processes decoding images in the streamed passes (0: this process)
    cache_mb: int = 1024  # decoded images kept for training's random reads (least recently used go first)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    ok = np.isfinite(a) & np.isfinite(b)
    return float(spearmanr(a[ok], b[ok]).statistic)


def fingerprint(*parts) -> str:
    """A short sha256 of arrays / tensors / strings: what a work-folder stage was made from."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            part = part.detach().cpu().contiguous().numpy()
        h.update(np.ascontiguousarray(part) if isinstance(part, np.ndarray) else str(part).encode())  # no copy
        h.update(b"\0")
    return h.hexdigest()[:16]


def read_metadata(data_dir: Path, paths: list[str]) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """``metadata.csv`` of a data folder, aligned to the loaded images' ``paths``: ({numeric column: float64
    (N,) with NaN where an image has no row or no value}, [ignored non-numeric columns], [notes for the log:
    reserved columns not carried, repeated identical rows]). NIfTI slices ``FILE#zNNN`` take their volume's
    row. No file: ({}, [], []). DataError for a file without a ``path`` column, a row naming a path outside the
    data folder (absolute, or through ``..``: refused by name before anything is looked up there), a row
    naming a file that is not in the folder, or two rows of one image that disagree."""
    meta = data_dir / "metadata.csv"
    if not meta.is_file():
        return {}, [], []
    try:
        with open(meta, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = list(reader.fieldnames or [])
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{meta}: not a readable CSV file ({type(e).__name__}: {e})") from None
    if "path" not in header:
        raise DataError(f"{meta}: needs a 'path' column (the image's path relative to the data folder); "
                        f"found {', '.join(header)[:200] or 'no header'}")
    root = data_dir.resolve()
    by_path, line_of, repeats = {}, {}, 0
    for k, r in enumerate(rows, start=2):
        p = (r.get("path") or "").strip()
        shown = p if len(p) <= 80 else p[:77] + "..."
        rel = Path(p.replace("\\", "/"))
        if not p or rel.is_absolute() or ".." in rel.parts or root not in (root / rel).resolve().parents:
            raise DataError(f"{meta} line {k}: {shown!r} is not a path inside --data {data_dir} (relative, no '..')")
        if not (data_dir / p).is_file():
            raise DataError(f"{meta} line {k}: {shown!r} is not a file in {data_dir}")
        key = rel.as_posix()
        if key in by_path:
            if by_path[key] != r:
                raise DataError(f"{meta} line {k}: {shown!r} already has a row (line {line_of[key]}) with other "
                                "values; keep one row per image")
            repeats += 1
        by_path[key], line_of[key] = r, line_of.get(key, k)
    notes = []
    reserved = [c for c in header if c in RESERVED_COLUMNS and c != "path"]
    if reserved:
        notes.append(f"metadata.csv: column(s) {', '.join(reserved)} not carried: the bundle's real.csv has its own "
                     "(path, score, label, x, y); rename them to keep them")
    if repeats:
        notes.append(f"metadata.csv: {repeats} repeated identical row(s) counted once")
    numeric, ignored = {}, []
    for col in header:
        if col in RESERVED_COLUMNS:
            continue
        vals = np.full(len(paths), np.nan)
        ok = True
        for i, p in enumerate(paths):
            r = by_path.get(p.split("#z")[0])
            v = (r.get(col) or "").strip() if r is not None else ""
            if v == "":
                continue
            try:
                vals[i] = float(v)
            except ValueError:
                ok = False
                break
            if not math.isfinite(vals[i]):
                vals[i] = np.nan
        if ok:
            numeric[col] = vals
        else:
            ignored.append(col)
    return numeric, ignored, notes


def check_inputs(data_dir: Path, cfg: BuildConfig) -> None:
    """Refusals that need no image decoded: a NIfTI folder mixed with images."""
    from core.bundles.data import list_images

    paths, _, _ = list_images(data_dir)
    kinds = {is_nifti(p) for p in paths}
    if len(kinds) == 2:
        n_nii = sum(is_nifti(p) for p in paths)
        raise DataError(f"--data {data_dir}: mixes {n_nii} NIfTI volumes with {len(paths) - n_nii} images; "
                        "build one bundle per kind (NIfTI slices are min-max normalised grey, images are not)")


def build_bundle(data_dir: str | Path, out: str | Path, work: str | Path, cfg: BuildConfig, log: Log,
                 progress: Optional[Progress] = None) -> dict:
    """The whole pipeline on ``data_dir``; writes the bundle to ``out`` and returns its manifest."""
    from core.maths.categorize import fit_labels
    from core.bundles.data import ImageSet
    from core.bundles.random_access import LazyImages, RandomAccess
    from core.bundles.real_set import scan
    from core.bundles.stream import class_names_for, open_source
    from core.nets.models import ClassifierConfig, UNetConfig, load_classifier, load_diffusion, save_model_run
    from core.maths.score import ScoreSettings, make_distance, resolve_t
    from core.nets.train import ClassifierTrainConfig, DiffusionTrainConfig, train_classifier, train_diffusion

    data_dir, out, work = Path(data_dir), Path(out), Path(work)
    report = lambda stage: (lambda i, n, m=None: progress(stage, i, n, m or {})) if progress else None  # noqa: E731
    timings: dict = {}
    clock = [time.perf_counter()]

    def stage_done(name: str) -> None:
        now = time.perf_counter()
        timings[name] = round(now - clock[0], 1)
        clock[0] = now
        if timings[name] >= 1:
            log(f"   {name}: {timings[name] / 60:.1f} min")

    check_inputs(data_dir, cfg)
    if work.resolve() == out.resolve() or out.resolve() in work.resolve().parents:
        raise DataError(f"--work {work}: lies inside --out {out}, which holds only the bundle; pass a --work "
                        "outside it (the default is OUT.work beside it)")
    if out.resolve() == data_dir.resolve() or data_dir.resolve() in out.resolve().parents:
        raise DataError(f"--out {out}: lies inside --data {data_dir}; pass an --out outside it")
    if work.resolve() == data_dir.resolve() or data_dir.resolve() in work.resolve().parents:
        raise DataError(f"--work {work}: lies inside --data {data_dir}; its model, scores and classifier would be "
                        "written among your images: pass a --work outside it (the default is OUT.work beside --out)")
    _check_out(out, cfg)  # before hours of work, again once the data is read, and right before writing
    given = None
    if cfg.model is not None:  # size, channels and schedule come from the model; a clash fails before any work
        given = load_diffusion(cfg.model)
        for flag, want, has in (("--size", cfg.size, given.image_size), ("--channels", cfg.channels, given.channels)):
            if want is not None and want != has:
                raise DataError(f"{flag} {want} disagrees with --model {cfg.model}, which takes {has} "
                                f"({'pixels' if flag == '--size' else 'channels'}); drop {flag} or pass {has}")
        size, channels = given.image_size, given.channels
    else:
        size, channels = cfg.size or 32, cfg.channels or 1
        UNetConfig(size, channels, tuple(cfg.widths)).check_size()
    if channels not in (1, 3):
        raise ValueError(f"--channels must be 1 or 3, got {channels}")
    if cfg.classes < 2:
        raise ValueError(f"--classes must be >= 2, got {cfg.classes}")
    if cfg.score_t is not None:  # an out-of-range --score-t fails now, not after the training and the sweep
        resolve_t(cfg.score_t, given.schedule.T if given is not None else DiffusionTrainConfig().T, "--score-t")
    log(f"1/6 data: {data_dir} at {size}x{size}, {channels} channel{'s' if channels > 1 else ''}")
    # Streamed (issue 28): one pass lists the readable images and fingerprints their pixels, keeping none; the
    # training stages read minibatches on demand behind a cache, the score and the bundle's images stream again.
    src = open_source(str(data_dir), size, channels, tuple(cfg.slice_band))
    scanned = scan(src, cfg.workers, progress=counter(report("load"), src.slots))
    class_ids = torch.from_numpy(scanned.class_ids) if scanned.class_ids is not None and src.class_names else None
    images = LazyImages(RandomAccess(src), scanned.slots, cache_bytes=int(cfg.cache_mb) << 20,
                        threads=max(1, cfg.workers))
    data = ImageSet(str(data_dir), scanned.names, images, class_ids,
                    class_names_for(src, scanned.class_ids) if class_ids is not None else [], scanned.skipped,
                    torch.from_numpy(scanned.slots))
    if data.skipped:
        log(f"   skipped {len(data.skipped)} unreadable file(s), first: {data.skipped[0][0]}: {data.skipped[0][1]}")
    if len(data) * size * size * channels > MAX_IMAGE_BYTES:  # the bundle's loader refuses more; say so now
        raise DataError(f"--data {data_dir}: {len(data)} images at {size}x{size}x{channels} are "
                        f"{len(data) * size * size * channels / 2**30:.1f} GiB, more than a bundle holds "
                        f"({MAX_IMAGE_BYTES / 2**30:.0f} GiB); build from a subset or at a smaller --size")
    if len(data) < MIN_PER_CLASS * cfg.classes:
        raise DataError(f"--data {data_dir}: {len(data)} image(s) is too few for --classes {cfg.classes} "
                        f"(at least {MIN_PER_CLASS} per class, {MIN_PER_CLASS * cfg.classes} in all); "
                        "add images or lower --classes")
    metadata, ignored, notes = read_metadata(data_dir, data.paths)
    for note in notes:
        log(f"   {note}")
    if ignored:
        log(f"   metadata.csv: non-numeric column(s) not carried: {', '.join(ignored)}")
    if metadata:
        log(f"   metadata.csv: numeric column(s) carried into the bundle: {', '.join(metadata)}")
    truth = None
    if cfg.truth is not None:
        if cfg.truth not in metadata:
            why = ("has no metadata.csv" if not (data_dir / "metadata.csv").is_file() else
                   "metadata.csv's column is not numeric" if cfg.truth in ignored else "metadata.csv has no such column")
            raise DataError(f"--truth {cfg.truth}: {data_dir} {why}; numeric columns: {', '.join(metadata) or 'none'}")
        truth = metadata[cfg.truth]
        if np.isfinite(truth).sum() < 10:
            raise DataError(f"--truth {cfg.truth}: only {int(np.isfinite(truth).sum())} image(s) have a value (need 10)")
        if np.unique(truth[np.isfinite(truth)]).size < 2:
            raise DataError(f"--truth {cfg.truth}: every image has the same value, so no setting can rank by it")
    data_id = scanned.fingerprint  # = fingerprint(all images stacked, "\n".join(paths)), without stacking them
    source = {"fingerprint": data_id, "name": data_dir.name}
    _check_out(out, cfg, source)
    stage_done("data")
    _claim_work(work, {"fingerprint": data_id, "n": len(data), "data": str(data_dir), "size": size,
                       "channels": channels}, cfg.force, log)

    run = work / "run"
    if given is not None:
        model = given
        log(f"2/6 diffusion model: given ({cfg.model}), {model.schedule.name} schedule, T={model.schedule.T}")
    else:
        state = run / "train_state.safetensors"
        done_steps = json.loads((run / "model.json").read_text()).get("step", 0) if (run / "model.json").is_file() else 0
        if (run / "model.json").is_file():
            u = json.loads((run / "model.json").read_text()).get("unet", {})
            if (u.get("image_size"), u.get("channels"), list(u.get("block_out_channels", []))) != (size, channels, list(cfg.widths)):
                raise DataError(f"--work {work}: holds a diffusion model for {u.get('image_size')} px, {u.get('channels')} "
                                f"channel(s), widths {u.get('block_out_channels')}; this build asks for {size} px, {channels}, "
                                f"{list(cfg.widths)}: pass another --work or delete it")
        if done_steps < cfg.diffusion_steps:
            est = _estimate_minutes(cfg.diffusion_steps - done_steps, size, channels)
            log(f"2/6 diffusion model: {cfg.diffusion_steps} steps" + (f" (resuming at {done_steps})" if done_steps else "")
                + f"; about {est:.0f} min on 2 CPU cores")
            train_diffusion(data, run, DiffusionTrainConfig(steps=cfg.diffusion_steps, batch_size=32, seed=cfg.seed,
                                                            save_every=250, unet=UNetConfig(size, channels, tuple(cfg.widths))),
                            resume=state.is_file(), progress=report("diffusion"))
        model = load_diffusion(run)
    model_id = _model_fingerprint(model, run, cfg)
    stage_done("diffusion")

    sweep = None
    sweep_t = tuple(cfg.sweep_t) if cfg.sweep_t is not None else SWEEP_T[model.schedule.name]
    if truth is not None:
        sweep_path = work / "sweep.json"
        made_from = {"model": model_id, "data": data_id, "truth_values": fingerprint(truth)}
        want = {"n": min(cfg.sweep_n, int(np.isfinite(truth).sum())), "distances": sorted(cfg.sweep_distances),
                "t_fracs": sorted(float(f) for f in sweep_t), "truth": cfg.truth, "version": SWEEP_VERSION,
                **made_from}
        if sweep_path.is_file():  # a sweep of other distances, timesteps, size or truth is redone, not reused
            old = json.loads(sweep_path.read_text())
            done = {"n": old.get("n"), "distances": sorted({r["distance"] for r in old.get("rows", [])}),
                    "t_fracs": sorted({float(r["t_frac"]) for r in old.get("rows", [])}),
                    "truth": old.get("truth", "severity"), "version": old.get("version"),
                    **{k: old.get(k) for k in made_from}}
            if done != want:
                log("   the sweep's settings, model or truth values changed since the last run: sweeping again")
                sweep_path.unlink()
        if not sweep_path.is_file():
            log(f"3/6 distance x timestep sweep on {want['n']} images against {cfg.truth}")
            sub, rows = sweep_rows(model, data.images, truth, cfg.sweep_distances, sweep_t, cfg.sweep_n, cfg.seed,
                                   log=log)
            atomic_write_json(sweep_path, {"n": int(len(sub)), "draws": 2, "rows": rows, "truth": cfg.truth,
                                           "version": SWEEP_VERSION, **made_from})
        sweep = json.loads(sweep_path.read_text())
        best = max(sweep["rows"], key=lambda r: -np.inf if r["spearman"] is None else r["spearman"])
        best_distance, best_t = best["distance"], int(best["t"])
    else:
        best_distance, best_t = DEFAULT_DISTANCE, model.schedule.default_score_t()
        why_d = "--score-distance" if cfg.score_distance else "the documented default"
        why_t = "--score-t" if cfg.score_t is not None else f"the paper's for a {model.schedule.name} schedule"
        log(f"3/6 no --truth: no sweep; the score uses {cfg.score_distance or best_distance} ({why_d}) at "
            f"t={best_t if cfg.score_t is None else cfg.score_t} ({why_t})")
    stage_done("sweep")

    scores_path, scores_meta = work / "scores.npy", work / "scores.json"
    t_final = best_t if cfg.score_t is None else resolve_t(cfg.score_t, model.schedule.T, "--score-t")
    settings = ScoreSettings(distance=cfg.score_distance or best_distance, t=t_final, draws=cfg.draws, seed=cfg.seed)
    score_made_from = {**settings.to_dict(), "n": len(data), "model": model_id, "data": data_id}
    made = scores_path.is_file() and scores_meta.is_file() and \
        json.loads(scores_meta.read_text()) in (score_made_from, settings.to_dict())
    if not made:
        if scores_path.is_file():  # other settings, model or data, or a kill between the two writes below
            log("   score settings or model changed since the last run: rescoring")
        scores_meta.unlink(missing_ok=True)
        est = ESTIMATES["score"] * len(data) * settings.draws * (size / 32) ** 2 / 60
        log(f"4/6 minority score of {len(data)} images: {settings.distance}, t={settings.t}, {settings.draws} draws; "
            f"about {est:.0f} min on 2 CPU cores")
        scores = score_streamed(model, src, data, settings, make_distance(settings.distance, seed=cfg.seed,
                                                                                model=model),
                                 work / "scores.parts", {**score_made_from, "source": src.fingerprint()},
                                 cfg.workers, report("score"), log)
        buf = io.BytesIO()
        np.save(buf, scores, allow_pickle=False)
        atomic_write_bytes(scores_path, buf.getvalue())
        atomic_write_json(scores_meta, score_made_from)
        shutil.rmtree(work / "scores.parts", ignore_errors=True)  # only once the scores are saved
    scores = np.load(scores_path, allow_pickle=False)
    if len(scores) != len(data):
        raise DataError(f"--work {work}: scores.npy has {len(scores)} rows for {len(data)} images; delete it to rescore")
    thresholds, labels = fit_labels(scores, cfg.classes)
    scores_id = fingerprint(scores)
    rho_full = spearman(scores, truth) if truth is not None else None
    if rho_full is not None:
        log(f"   Spearman(score, {cfg.truth}) on all {len(data)} images: {rho_full:+.3f}")
    stage_done("score")

    clf_dir = work / "classifier"
    if (clf_dir / "classifier.json").is_file():
        info = json.loads((clf_dir / "classifier.json").read_text())
        net = info.get("config", {})
        if (info.get("score_settings"), info.get("scores"), info.get("steps"), net.get("base_channels"),
                net.get("num_outputs"), net.get("image_size"), net.get("channels")) != (
                settings.to_dict(), scores_id, cfg.clf_steps, cfg.clf_base_channels, cfg.classes, size, channels):
            log("   classifier was trained for other labels or settings: retraining")
            (clf_dir / "classifier.json").unlink()
    if not (clf_dir / "classifier.json").is_file():
        est = ESTIMATES["classifier"] * cfg.clf_steps * (size / 32) ** 2 * cfg.clf_base_channels / 16 / 60
        log(f"5/6 minority classifier: L={cfg.classes}, {cfg.clf_steps} steps; about {est:.0f} min on 2 CPU cores")
        ccfg = ClassifierTrainConfig(steps=cfg.clf_steps, batch_size=cfg.clf_batch, seed=cfg.seed, eval_every=250,
                                     net=ClassifierConfig(size, channels, cfg.classes, base_channels=cfg.clf_base_channels))
        train_classifier(data, labels, model.schedule, clf_dir, ccfg, thresholds.tolist(),
                         {"score_settings": settings.to_dict(), "scores": scores_id}, progress=report("classifier"))
    clf = load_classifier(clf_dir)
    stage_done("classifier")

    log("6/6 2-D map and bundle")
    fit = fit_subset(len(data), size * size * channels, cfg.seed)
    pca_mean, pca_comps = fit_pca(data.images[torch.from_numpy(fit)].permute(0, 2, 3, 1).numpy())
    if len(fit) < len(data):
        log(f"   2-D map: PCA basis fitted on a seeded {len(fit)} of the {len(data)} images")
    deflated = work / "real_images.deflate"  # the bundle's images, compressed as they stream past
    z = write_pass(src, scanned, pca_mean, pca_comps, deflated, cfg.workers,
                   progress=counter(report("bundle"), src.slots))
    coords, map_method = map_coords(z, cfg.seed, log, cfg.map_method)
    del z
    _check_out(out, cfg, source)
    truth_values = truth if truth is not None else np.full(len(data), np.nan)
    columns = list(metadata)
    table = io.StringIO()
    w = csv.writer(table, lineterminator="\n")
    w.writerow(["path", "score", "label", *columns, "x", "y"])
    for i, p in enumerate(data.paths):
        w.writerow([p, f"{scores[i]:.6g}", int(labels[i]), *(_fmt(metadata[c][i]) for c in columns),
                    f"{coords[i, 0]:.4f}", f"{coords[i, 1]:.4f}"])
    score_info = {**settings.to_dict()}
    if truth is not None:
        score_info["spearman_vs_truth"] = rho_full if np.isfinite(rho_full) else None  # JSON has no NaN
        if cfg.truth == "severity":
            score_info["spearman_vs_severity"] = score_info["spearman_vs_truth"]  # the key older MRI readers know

    manifest: dict = {}

    def write(folder: Path) -> None:  # a fresh temp folder; commit_folder moves it into place, manifest last
        if given is not None:
            save_model_run(folder, model, {"source": cfg.model})
        else:
            for name in ("model.json", "model.safetensors"):
                atomic_write_bytes(folder / name, (run / name).read_bytes())
        for name in ("classifier.json", "classifier.safetensors"):
            atomic_write_bytes(folder / name, (clf_dir / name).read_bytes())
        save_tensors_streamed(folder / "real.safetensors", {
            "images_shape": torch.tensor([len(data), size, size, channels], dtype=torch.int64),
            "score": torch.from_numpy(scores.astype(np.float32)),
            "label": torch.from_numpy(labels), "severity": torch.from_numpy(truth_values.astype(np.float32)),
            "coords": torch.from_numpy(coords), "pca_mean": torch.from_numpy(pca_mean),
            "pca_components": torch.from_numpy(pca_comps), "row": data.rows.clone()},
            {"images_deflate": deflated})  # as pack_images writes them, never held whole
        atomic_write_text(folder / "real.csv", table.getvalue())
        stage_done("map and bundle")
        manifest.update({
            "schema_version": BUNDLE_SCHEMA, "name": cfg.name or out.name,
            "dataset": {"name": data_dir.name, "n": len(data), "seed": cfg.seed, "truth": cfg.truth,
                        "metadata_columns": columns, "skipped": len(data.skipped), "fingerprint": data_id,
                        **cfg.dataset},
            "image_size": size, "channels": channels, "schedule": model.schedule.name, "T": model.schedule.T,
            "num_classes": cfg.classes, "thresholds": thresholds.tolist(),
            "score": score_info, "sweep": sweep,
            "training": {"diffusion_steps": None if given is not None else cfg.diffusion_steps,
                         "model": cfg.model, "widths": None if given is not None else list(cfg.widths),
                         "classifier_steps": cfg.clf_steps, "classifier_base_channels": cfg.clf_base_channels,
                         "classifier_metrics": clf.info.get("metrics")},
            "map": map_method, "seeds": {"data": cfg.seed, "training": cfg.seed, "score": cfg.seed},
            "config": {k: list(v) if isinstance(v, tuple) else v
                       for k, v in {**asdict(cfg), "sweep_t": sweep_t}.items()
                       if k not in ("dataset", "force", "app_sampler", "app_steps", "workers", "cache_mb")},
            **({"app": {"sampler": cfg.app_sampler, **({"steps": cfg.app_steps} if cfg.app_steps else {})}}
               if cfg.app_sampler else {}),
            "stage_seconds": timings, "versions": _versions(),
            "files": {name: sha256_file(folder / name) for name in BUNDLE_FILES},
        })
        atomic_write_json(folder / "manifest.json", manifest)

    commit_folder(out, write, last="manifest.json")
    deflated.unlink(missing_ok=True)
    return manifest  # in stage order (the file's keys are sorted)


def _check_out(out: Path, cfg: BuildConfig, data: Optional[dict] = None) -> None:
    """Refuse to overwrite a folder that holds something other than this bundle, unless forced: another
    bundle's name, or (once the data is read, ``data`` = {"fingerprint", "name"}) a bundle built from other
    data (by its manifest's fingerprint, or by the data folder's name for bundles older than fingerprints)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a folder")
    if cfg.force:
        return
    m = out / "manifest.json"
    if m.is_file():
        try:
            manifest = json.loads(m.read_text())
            name, source = manifest.get("name"), manifest.get("dataset") or {}
        except (OSError, ValueError, AttributeError):
            name, source = None, {}
        if name != (cfg.name or out.name):
            raise DataError(f"--out {out}: already holds the bundle {name!r}; pass --force to replace it, or another --out")
        if data is not None and (source.get("fingerprint", data["fingerprint"]) != data["fingerprint"]
                                 or ("fingerprint" not in source and source.get("name") != data["name"])):
            raise DataError(f"--out {out}: already holds the bundle {name!r}, built from other data "
                            f"({source.get('n', '?')} images of {source.get('name', '?')!r}); pass --force to "
                            "replace it, or another --out")
        return
    others = [p.name for p in out.iterdir() if p.name not in BUNDLE_FILES and not p.name.startswith(".")]
    if others:
        raise DataError(f"--out {out}: is not empty and not a bundle (holds {others[0]!r}); pass --force or another --out")


def _claim_work(work: Path, record: dict, force: bool, log: Log) -> None:
    """Tie the work folder to its data: a folder made from other images (or at another size or channel count)
    is refused, since its model, scores and classifier would carry over; ``--force`` re-claims it (its model
    is kept, everything after it is redone). A folder without a record (older builds) is claimed."""
    path = work / "data.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = {}
        if old.get("fingerprint") == record["fingerprint"]:
            return
        if (old.get("size"), old.get("channels")) not in ((record["size"], record["channels"]), (None, None)):
            what = (f"a build at {old.get('size')} px, {old.get('channels')} channel(s) (this one: {record['size']} px, "
                    f"{record['channels']})")
        else:
            what = f"the intermediate files of other data ({old.get('n', '?')} images from {old.get('data', '?')})"
        if not force:
            raise DataError(f"--work {work}: holds {what}; pass another --work, delete it, or --force to reuse its "
                            "model anyway")
        log(f"   --force: --work {work} held {what}; reusing its model, redoing the sweep, score and classifier")
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)


def _fmt(v: float) -> str:
    return "" if not np.isfinite(v) else f"{v:.6g}"


def _model_fingerprint(model, run: Path, cfg: BuildConfig) -> str:
    """What the later stages were made with: our run's recorded weights sha256, or for a given --model the
    fingerprint of its weights (so another path to the same model reuses, new weights at one path do not)."""
    if cfg.model is not None:
        return fingerprint(*(v for _, v in sorted(model.net.state_dict().items())))
    try:
        return json.loads((run / "model.json").read_text()).get("weights_sha256", "")
    except (OSError, ValueError):
        return ""


# seconds on 2 CPU cores at 32x32, from the MRI build (docs/RESULTS.md): a diffusion step (batch 32, widths
# 32,64,64), one image-draw of the unet-feat score, a classifier step (batch 64, base 16); scaled by pixels
ESTIMATES = {"diffusion": 52 * 60 / 8000, "score": 14.5 * 60 / (6000 * 20), "classifier": 9.5 * 60 / 6000}


def _estimate_minutes(steps: int, size: int, channels: int) -> float:
    """Diffusion training time on 2 CPU cores, scaled from the MRI build by steps and pixels."""
    return ESTIMATES["diffusion"] * steps * (size / 32) ** 2 / 60


def sweep_rows(model, images: torch.Tensor, truth: np.ndarray, distances, t_fracs, n: int, seed: int,
               draws: int = 2, log: Optional[Log] = None) -> tuple[np.ndarray, list]:
    """The build's distance x timestep sweep: Spearman(minority score, truth) on a seeded subset of ``n`` of the
    uint8 images (N, C, H, W) that have a finite ``truth`` (N,) value, for each distance and t = frac * T;
    returns (subset indices, rows)."""
    from core.maths.score import ScoreSettings, make_distance, minority_scores

    rng = np.random.default_rng(seed)
    known = np.flatnonzero(np.isfinite(truth))  # only images with a truth value can rank (all of them: as before)
    sub = np.sort(rng.choice(known, size=min(n, len(known)), replace=False))
    sub_t = torch.as_tensor(sub)
    rows = []
    for dist_name in distances:
        dist = make_distance(dist_name, seed=seed, model=model)
        for frac in t_fracs:
            st = ScoreSettings(distance=dist_name, t=int(round(frac * model.schedule.T)), draws=draws, seed=seed)
            s = minority_scores(model, images[sub_t], sub_t, st, dist, batch_size=128)
            rho = spearman(s, truth[sub])
            rows.append({"distance": dist_name, "t_frac": frac, "t": st.t,
                         "spearman": rho if np.isfinite(rho) else None})  # None: undefined (e.g. constant scores)
            if log is not None:
                log(f"   {dist_name:10s} t={st.t:4d}: Spearman {rho:+.3f}")
    return sub, rows


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "diffusers", "accelerate", "numpy", "nilearn", "nibabel", "umap-learn", "lpips"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out
