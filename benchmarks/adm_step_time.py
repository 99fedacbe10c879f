"""Time one minority-guided ancestral step of the paper's LSUN-Bedrooms setting with random weights.

The model is the ``gd-lsun-bedroom`` preset (552.8M parameters, learned variance) and the guidance is the
official minority classifier: the ``gd-256-classifier`` trunk up to its middle block plus the ``mc-lsun-head``
(``MinorityCascade``), so a step is one UNet forward plus one classifier forward and backward, run through
``sample_ddpm`` exactly as ``sample --sampler ddpm --classifier`` runs it. Random weights give the same cost
as the real ones. For scale: the paper reports about 0.15 s per image for a whole 250-NFE guided sample on
CIFAR-10 (32x32) on one A100 (0.12 s unguided); it gives no 256x256 figure.

    python benchmarks/adm_step_time.py [--batch 8] [--steps 3] [--device auto|cpu|cuda] [--precision auto]

Writes benchmarks/results/adm_step_time_<device>.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import machine, sync, write  # noqa: E402
from core.maths.guidance import ClassifierGuidance  # noqa: E402
from core.maths.sampling import sample_ddpm  # noqa: E402
from core.nets.adm import adm_schedule, build_unet2d, count_parameters, preset  # noqa: E402
from core.nets.adm_encoder import AdmEncoder, MinorityCascade  # noqa: E402
from core.nets.models import DiffusionModel  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="guided steps timed after one warm-up step")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--precision", default="auto", help="the UNet's compute precision (auto = bf16 on CUDA)")
    ap.add_argument("--scale", type=float, default=3.5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    p = preset("gd-lsun-bedroom")
    net = build_unet2d(p).eval()
    model = DiffusionModel(net, adm_schedule(p), p.image_size, p.in_channels, variance_type="learned_range").to(device)
    model.precision = args.precision
    classifier = MinorityCascade(AdmEncoder(preset("gd-256-classifier")), AdmEncoder(preset("mc-lsun-head")))
    classifier = classifier.eval().requires_grad_(False).to(device)
    guidance = ClassifierGuidance(classifier, target=99, scale=args.scale)  # the rarest of the head's 100 classes

    steps = model.schedule.timesteps(250)  # ADM's 250 respaced steps; time the first (noisiest) ones
    x_T = torch.randn(args.batch, 3, 256, 256, generator=gen).to(device)

    def run(n: int) -> float:
        sync()
        t0 = time.perf_counter()
        sample_ddpm(model, x_T, steps[-n:], guidance=guidance, generator=gen)
        sync()
        return time.perf_counter() - t0

    warm = run(1)
    total = run(args.steps)
    per_step = total / args.steps
    result = {"what": "one minority-guided ancestral step, gd-lsun-bedroom UNet + gd-256-classifier trunk "
                      "+ mc-lsun-head, random weights",
              "batch": args.batch, "steps_timed": args.steps, "precision": args.precision,
              "unet_params_M": round(count_parameters(p) / 1e6, 1),
              "classifier_params_M": round(sum(q.numel() for q in classifier.parameters()) / 1e6, 2),
              "warmup_step_s": round(warm, 3), "seconds_per_step": round(per_step, 3),
              "seconds_per_image_step": round(per_step / args.batch, 4),
              "peak_cuda_gb": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if device.type == "cuda" else None,
              "machine": {**machine(), "device": device.type}}
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"adm_step_time_{device.type}.json"
    write(out, result)
    print(f"{device.type}: {per_step:.3f} s per guided step at batch {args.batch} "
          f"({per_step / args.batch:.4f} s per image per step); raw -> {out}")
    return result


if __name__ == "__main__":
    main()
