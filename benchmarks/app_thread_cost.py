"""Issue 26.3: where a live grid's time goes, in-process on the MRI bundle (16 images, the standard grid cached).

Rows (medians of --repeats, after one warm-up each):
- sync: the guided sampling and the captions' scores called directly on the calling thread;
- app: ``Studio.generate_all`` as the app runs it (a fresh thread per run). Session 11's stored results also have a
  one-long-lived-worker row, measured while the app had that worker (reverted since);
and the parts of one run: sampling, caption scores, estimated atrophy, gallery items (upscaled PNG-ready arrays).

    python benchmarks/app_thread_cost.py --settings "DDIM:25,DPM-Solver++ 2M:10" --out benchmarks/results/app_thread_cost.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write  # noqa: E402
from app import handlers as h  # noqa: E402


def median_time(fn, repeats):
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return float(np.median(out))


def trials(studio, req, g, repeats) -> dict:
    """The guided sampling's median time as it is, with channels-last weights, and with torch.compile (its
    compile time apart). inference_mode is not tried: the guidance needs autograd through the classifier."""
    import torch

    model, clf = studio.bundle.model, studio.bundle.classifier.net
    run = lambda: studio._sample(req, g, lambda s: None, None)  # noqa: E731
    out = {"as_is": median_time(run, repeats)}
    model.net.to(memory_format=torch.channels_last)
    clf.to(memory_format=torch.channels_last)
    out["channels_last"] = median_time(run, repeats)
    model.net.to(memory_format=torch.contiguous_format)
    clf.to(memory_format=torch.contiguous_format)
    net_fwd, clf_fwd = model.net.forward, clf.forward
    try:
        model.net.forward = torch.compile(net_fwd)
        clf.forward = torch.compile(clf_fwd)
        t0 = time.perf_counter()
        run()
        out["compile_first_run"] = time.perf_counter() - t0
        out["compiled"] = median_time(run, repeats)
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        out["compile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        model.net.forward, clf.forward = net_fwd, clf_fwd
    print("  trials: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()),
          flush=True)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--settings", default="DDIM:25,DPM-Solver++ 2M:10")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/app_thread_cost.json")
    p.add_argument("--trials", action="store_true", help="also time the guided sampling with channels-last and "
                                                         "torch.compile of the backbone and the classifier")
    a = p.parse_args()
    studio = h.Studio(h.DEFAULT_BUNDLE).warm()
    res = {"machine": machine(), "repeats": a.repeats, "rows": {}}
    for item in a.settings.split(","):
        label, steps = item.rsplit(":", 1)
        req = h.GenerateRequest(49, 1.5, steps=int(steps), n=16, seed=1, sampler=label)
        studio.generate_all(req)  # caches the standard grid
        g = studio.guidance(req)
        parts = {}
        images = studio._sample(req, g, lambda s: None, None)
        parts["sampling"] = median_time(lambda: studio._sample(req, g, lambda s: None, None), a.repeats)
        parts["caption_scores"] = median_time(lambda: studio.score(images, req.seed), a.repeats)
        parts["atrophy"] = median_time(lambda: studio.atrophy(images), a.repeats)
        parts["gallery_items"] = median_time(lambda: h.captions(images, np.zeros(16), np.zeros(16)), a.repeats)
        sync = median_time(lambda: (studio.score(studio._sample(req, g, lambda s: None, None), req.seed)), a.repeats)
        app_run = median_time(lambda: studio.generate_all(req), a.repeats)
        row = {"sync_s": sync, "app_s": app_run, "parts_s": parts,
               "trials_sampling_s": trials(studio, req, g, a.repeats) if a.trials else None}
        res["rows"][item] = row
        print(f"{item}: sync {sync:.2f} s, app (thread per run) {app_run:.2f} s; parts: "
              + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()), flush=True)
    write(Path(a.out), res)


if __name__ == "__main__":
    main()
