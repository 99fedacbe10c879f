"""data mri-phantom, data faces, build and build-demo."""
from __future__ import annotations

import sys
from pathlib import Path


from core.maths.score import make_distance, resolve_t
from core.cli.common import _band, _bar, _positive, _widths


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def _count_bar(n: int, name: str, every: int = 100):
    """A bar over ``n`` items and its ``progress(i, total)`` callback (redrawn every ``every`` items)."""
    bar = _bar(n, name)

    def progress(i, total):
        bar.n = i
        if i == total or i % every == 0:
            bar.refresh()

    return bar, progress


def cmd_data_mri_phantom(a) -> int:
    from core.demos.phantom import build_mri_phantom

    _positive("n", a.n)
    if a.masks is not None and Path(a.masks).resolve().is_relative_to(Path(a.out).resolve()):
        raise ValueError(f"--masks {a.masks} must lie outside --out {a.out} (a build of --out would read them as images)")
    bar, progress = _count_bar(a.n, "mri-phantom")
    out = build_mri_phantom(a.out, n=a.n, size=a.size, seed=a.seed, progress=progress, masks=a.masks)
    bar.close()
    print(f"{a.n} slices {a.size}x{a.size} -> {out}/images, ground truth in {out}/metadata.csv"
          + (f", masks in {a.masks}" if a.masks else ""), file=sys.stderr)
    return 0


def cmd_data_faces(a) -> int:
    from core.demos.faces import build_faces, expected_rare_share

    _positive("n", a.n)
    bar, progress = _count_bar(a.n, "faces", every=200)
    out = build_faces(a.out, n=a.n, size=a.size, seed=a.seed, progress=progress)
    bar.close()
    print(f"{a.n} faces {a.size}x{a.size} RGB -> {out}/images; attributes and rarity in {out}/metadata.csv "
          f"(expected share with a rare attribute {expected_rare_share():.3f})", file=sys.stderr)
    return 0


def _stage_bars():
    """(progress, log) callbacks that draw one bar per stage and print stage lines between bars."""
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

    return progress, log


def _check_score_flags(a, T: int) -> None:
    """Fail before hours of work, not after: a bad timestep, or lpips without its VGG weights offline."""
    if a.score_t is not None:
        resolve_t(a.score_t, T, "--score-t")
    if a.score_distance is not None and a.score_distance != "unet-feat":  # unet-feat needs only the model
        make_distance(a.score_distance)


def cmd_build(a) -> int:
    from core.bundles.build import BuildConfig, build_bundle

    for name in ("diffusion_steps", "clf_steps", "draws", "sweep_n"):
        _positive(name.replace("_", "-"), getattr(a, name))
    _positive("classes", a.classes, 2)
    _positive("workers", a.workers, 0)
    _positive("cache-mb", a.cache_mb, 0)
    if a.size is not None and not 8 <= a.size <= 1024:
        raise ValueError(f"--size must be in [8, 1024], got {a.size}")
    cfg = BuildConfig(size=a.size, channels=a.channels, seed=a.seed, model=a.model, diffusion_steps=a.diffusion_steps,
                      widths=_widths(a.widths), truth=a.truth, sweep_n=a.sweep_n, draws=a.draws, classes=a.classes,
                      score_distance=a.score_distance, score_t=a.score_t, clf_steps=a.clf_steps,
                      clf_base_channels=a.clf_base_channels, map_method=a.map, name=a.name,
                      slice_band=_band(a.slice_band), force=a.force, app_sampler=a.app_sampler,
                      app_steps=a.app_steps, workers=a.workers, cache_mb=a.cache_mb)
    if a.app_steps is not None and (a.app_sampler is None or a.app_steps < 1):
        raise ValueError("--app-steps needs --app-sampler and must be >= 1")
    if a.model is None:
        from core.nets.train import DiffusionTrainConfig

        _check_score_flags(a, DiffusionTrainConfig().T)  # a given model's T is checked once it is loaded
    elif a.score_distance is not None and a.score_distance != "unet-feat":
        make_distance(a.score_distance)
    progress, log = _stage_bars()
    manifest = build_bundle(a.data, a.out, a.work, cfg, log, progress)
    rho = manifest["score"].get("spearman_vs_truth")
    times = ", ".join(f"{k} {v / 60:.1f} min" for k, v in manifest["stage_seconds"].items())
    log(f"bundle -> {a.out} (score {manifest['score']['distance']} t={manifest['score']['t']}"
        + (f", Spearman vs {a.truth} {rho:+.3f}" if rho is not None else "") + f"; stages: {times}; "
        f"intermediate files in {a.work})")
    return 0


def cmd_build_demo(a) -> int:
    from core.bundles.demo import DemoConfig, build_demo

    for name in ("n", "diffusion_steps", "clf_steps", "draws", "sweep_n"):
        _positive(name.replace("_", "-"), getattr(a, name))
    _positive("classes", a.classes, 2)
    cfg = DemoConfig(n=a.n, size=a.size, seed=a.seed, diffusion_steps=a.diffusion_steps, widths=_widths(a.widths),
                     sweep_n=a.sweep_n, draws=a.draws, classes=a.classes, clf_steps=a.clf_steps,
                     clf_base_channels=a.clf_base_channels, map_method=a.map, score_distance=a.score_distance,
                     score_t=a.score_t)
    from core.nets.train import DiffusionTrainConfig

    _check_score_flags(a, DiffusionTrainConfig().T)  # build-demo trains with the default T
    work = a.work  # main() set the default, OUT.work, when the flag was not given
    progress, log = _stage_bars()
    manifest = build_demo(a.out, work, cfg, log, progress)
    log(f"bundle -> {a.out} (score {manifest['score']['distance']} t={manifest['score']['t']}, Spearman vs severity "
        f"{manifest['score']['spearman_vs_truth']:+.3f}; intermediate files in {work})")
    return 0
