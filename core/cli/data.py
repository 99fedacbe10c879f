"""data mri-phantom and build-demo."""
from __future__ import annotations

import sys


from ..score import make_distance, resolve_t
from .common import _bar, _positive, _widths


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def cmd_data_mri_phantom(a) -> int:
    from ..phantom import build_mri_phantom

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
    from ..demo import DemoConfig, build_demo

    for name in ("n", "diffusion_steps", "clf_steps", "draws", "sweep_n"):
        _positive(name.replace("_", "-"), getattr(a, name))
    _positive("classes", a.classes, 2)
    cfg = DemoConfig(n=a.n, size=a.size, seed=a.seed, diffusion_steps=a.diffusion_steps, widths=_widths(a.widths),
                     sweep_n=a.sweep_n, draws=a.draws, classes=a.classes, clf_steps=a.clf_steps,
                     clf_base_channels=a.clf_base_channels, map_method=a.map, score_distance=a.score_distance,
                     score_t=a.score_t)
    # fail before hours of work, not after: a bad timestep, or lpips without its VGG weights offline
    if a.score_t is not None:
        from ..train import DiffusionTrainConfig

        resolve_t(a.score_t, DiffusionTrainConfig().T, "--score-t")  # build-demo trains with the default T
    if a.score_distance is not None and a.score_distance != "unet-feat":  # unet-feat needs only the model
        make_distance(a.score_distance)
    work = a.work  # main() set the default, OUT.work, when the flag was not given
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
