"""Training: the diffusion backbone (eps objective, EMA) and the noise-conditioned minority classifier.

Both loops run under ``accelerate`` (one process on a CPU, or many under ``accelerate launch`` /
``torchrun``; gradients are averaged by accelerate's DDP wrapper). Progress goes to a callback.
Resumable state (weights, EMA, optimiser, RNG, step) is one safetensors file written atomically,
so a kill at any moment leaves the newest complete checkpoint loadable.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from core.nets.checkpoint import load_tensors, save_tensors
from core.bundles.data import ImageSet, to_model_range
from core.errors import CheckpointError, MinorityError
from core.nets.models import (ClassifierConfig, NoiseConditionedClassifier, UNetConfig, build_unet, save_classifier,
                     save_diffusion, schedule_config)
from core.maths.schedule import NoiseSchedule, make_schedule

Progress = Callable[[int, int, dict], None]
MAX_BAD_STEPS = 10


def make_accelerator():
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    mp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    # cpu=True lets accelerate run several CPU processes (gloo) under torchrun / accelerate launch
    return Accelerator(mixed_precision=mp, cpu=not cuda)


# ---------------------------------------------------------------------------------------------
# resumable state: one safetensors file, tensors + a JSON string in its metadata
# ---------------------------------------------------------------------------------------------
def _save_state(path: Path, model, ema, optimizer, gen: torch.Generator, step: int, info: dict) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    opt = optimizer.state_dict()
    for pid, st in opt["state"].items():
        for name, val in st.items():
            tensors[f"optim.{pid}.{name}"] = val if torch.is_tensor(val) else torch.tensor(val)
    tensors["rng"] = gen.get_state()
    meta = {"step": step, "param_groups": opt["param_groups"], **info}
    save_tensors(path, tensors, metadata={"state": json.dumps(meta)})


def _load_state(path: Path, model, ema, optimizer, gen: torch.Generator) -> int:
    from safetensors import safe_open

    tensors = load_tensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("state", "{}"))
    if "step" not in meta:
        raise CheckpointError(f"{path}: no training state in metadata")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if ema is not None:
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    gen.set_state(tensors["rng"])
    return int(meta["step"])


@torch.no_grad()
def _ema_update(ema, model, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def _check_finite(loss: torch.Tensor, bad: int, step: int) -> int:
    """Count consecutive non-finite losses; stop with a clear error when there are too many."""
    if torch.isfinite(loss):
        return 0
    if bad + 1 >= MAX_BAD_STEPS:
        raise MinorityError(f"training diverged: {MAX_BAD_STEPS} non-finite losses in a row at step {step}; "
                            "the last checkpoint is kept (lower --lr)")
    return bad + 1


# ---------------------------------------------------------------------------------------------
# diffusion backbone
# ---------------------------------------------------------------------------------------------
@dataclass
class DiffusionTrainConfig:
    steps: int = 2000  # optimiser steps
    batch_size: int = 32  # per process
    lr: float = 2e-4  # AdamW, constant after a 100-step warm-up
    ema_decay: float = 0.999  # EMA of the weights, with the usual (1+n)/(10+n) warm-up
    schedule: str = "linear"  # linear | cosine
    T: int = 1000  # training timesteps
    seed: int = 0
    save_every: int = 500  # steps between checkpoints (always at the end too)
    class_cond: bool = False  # condition on the data folder's classes
    unet: UNetConfig = field(default_factory=UNetConfig)


def train_diffusion(data: ImageSet, out: str | Path, cfg: DiffusionTrainConfig, resume: bool = False,
                    progress: Optional[Progress] = None) -> dict:
    """Train a UNet2DModel on ``data`` (images already at cfg.unet's size); writes RUN/model.* and RUN/train_state.*."""
    import copy

    if cfg.steps < 1:
        raise ValueError(f"steps must be >= 1, got {cfg.steps}")
    if cfg.class_cond and data.class_ids is None:
        raise MinorityError(f"--class-cond needs one sub-folder per class in --data {data.root}")
    out = Path(out)
    acc = make_accelerator()
    cfg.unet.num_classes = len(data.class_names) if cfg.class_cond else 0
    schedule = make_schedule(cfg.schedule, cfg.T)
    torch.manual_seed(cfg.seed)  # weight init
    net = build_unet(cfg.unet)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + acc.process_index)
    state_path = out / "train_state.safetensors"
    step = 0
    if resume and state_path.is_file():
        step = _load_state(state_path, net, ema, opt, gen)
    net, opt = acc.prepare(net, opt)
    ema.to(acc.device)
    images = data.images
    labels = data.class_ids if cfg.class_cond else None
    abar = schedule.abar.to(acc.device)
    sched_cfg = schedule_config(schedule)
    extra = {"data": data.root, "num_images": len(data), "train": {k: v for k, v in asdict(cfg).items() if k != "unet"}}
    bad = 0

    def save(final: bool = False):
        if acc.is_main_process:
            raw = acc.unwrap_model(net)
            _save_state(state_path, raw, ema, opt, gen, step, {"kind": "diffusion"})
            save_diffusion(out, ema, cfg.unet, sched_cfg, data.class_names, {**extra, "step": step})
        acc.wait_for_everyone()

    net.train()
    while step < cfg.steps:
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen)
        x0 = to_model_range(images[idx]).to(acc.device)
        t = torch.randint(0, cfg.T, (cfg.batch_size,), generator=gen).to(acc.device)
        eps = torch.randn(x0.shape, generator=gen).to(acc.device)
        x_t = abar[t].float().sqrt().view(-1, 1, 1, 1) * x0 + (1 - abar[t].float()).sqrt().view(-1, 1, 1, 1) * eps
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / 100)
        with acc.autocast():
            y = labels[idx].to(acc.device) if labels is not None else None
            pred = net(x_t, t, class_labels=y).sample
            loss = F.mse_loss(pred.float(), eps)
        bad = _check_finite(loss.detach(), bad, step)
        if bad:
            opt.zero_grad(set_to_none=True)
            continue
        acc.backward(loss)
        acc.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        _ema_update(ema, acc.unwrap_model(net), min(cfg.ema_decay, (1 + step) / (10 + step)))
        if progress is not None and acc.is_main_process:
            progress(step, cfg.steps, {"loss": float(loss.detach())})
        if step % cfg.save_every == 0 or step == cfg.steps:
            save()
    if step == 0 or not (out / "model.json").is_file():
        save()
    return {"steps": step, "out": str(out)}


# ---------------------------------------------------------------------------------------------
# minority classifier p_psi(l | x_t, t[, c])
# ---------------------------------------------------------------------------------------------
@dataclass
class ClassifierTrainConfig:
    steps: int = 2000
    batch_size: int = 64  # per process (the paper uses 256 on GPUs)
    lr: float = 3e-4  # AdamW, linearly annealed to 0 (official setting)
    weight_decay: float = 0.05
    holdout: float = 0.1  # fraction of images held out for loss / accuracy / mean absolute class error
    eval_every: int = 200
    seed: int = 0
    net: ClassifierConfig = field(default_factory=ClassifierConfig)


def _rank_corr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman correlation of two 1-D tensors; 0 when either is constant."""
    from scipy.stats import spearmanr

    if len(a) < 2 or bool((a == a[0]).all()) or bool((b == b[0]).all()):
        return 0.0
    return float(spearmanr(a.numpy(), b.numpy())[0])


@torch.no_grad()
def evaluate_classifier(net, schedule: NoiseSchedule, images: torch.Tensor, labels: torch.Tensor,
                        class_ids: Optional[torch.Tensor], seed: int, batch_size: int = 256) -> dict:
    """Held-out metrics on fixed (x_t, t ~ U[0, T)) draws of uint8 ``images`` (N, C, H, W), ``labels`` (N,) in [0, L).

    Over all t: cross-entropy, accuracy, mean |predicted - true| class, and the Spearman correlation of the
    expected class sum_l l p(l | x_t) with the true class (the ordering guidance relies on). On the draws with
    t < T/4 (little noise): accuracy and mean class error, since at large t no classifier can tell classes apart.
    """
    if len(images) == 0:
        return {}
    g = torch.Generator().manual_seed(seed + 7)
    t_all = torch.randint(0, schedule.T, (len(images),), generator=g)
    # the noise is drawn batch by batch from the same generator: one batch of float32 noise in memory, not the
    # whole held-out set's (4096 images x 64x64x3 is 200 MB; issue 28)
    device = next(net.parameters()).device
    preds, expected = [], []
    loss = 0.0
    for s in range(0, len(images), batch_size):
        sl = slice(s, s + batch_size)
        x0 = to_model_range(images[sl]).to(device)
        t = t_all[sl].to(device)
        x_t = schedule.q_sample(x0, t, torch.randn(x0.shape, generator=g).to(device))
        logits = net(x_t, t, class_ids[sl].to(device) if class_ids is not None else None).float()
        loss += float(F.cross_entropy(logits, labels[sl].to(device), reduction="sum"))
        preds.append(logits.argmax(-1).cpu())
        p = logits.softmax(-1)
        expected.append((p * torch.arange(p.shape[-1], device=p.device, dtype=p.dtype)).sum(-1).cpu())
    pred, ev, y = torch.cat(preds), torch.cat(expected), labels.cpu()
    err = (pred - y).abs().float()
    low = t_all < schedule.T // 4
    out = {"val_loss": loss / len(images), "val_acc": float((pred == y).float().mean()), "val_mae": float(err.mean()),
           "val_rank_corr": _rank_corr(ev, y)}
    if low.any():
        out.update(val_acc_low_t=float((pred[low] == y[low]).float().mean()), val_mae_low_t=float(err[low].mean()))
    return out


MAX_EVAL = 4096  # held-out images the classifier's metrics are computed on (a fixed subset beyond that)


def split_holdout(n: int, frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(round(n * frac)) if n >= 20 else 0
    return perm[k:].sort().values, perm[:k].sort().values


def train_classifier(data: ImageSet, labels: np.ndarray, schedule: NoiseSchedule, out: str | Path,
                     cfg: ClassifierTrainConfig, thresholds, extra: dict, class_cond: bool = False,
                     progress: Optional[Progress] = None) -> dict:
    """Cross-entropy on (q_sample(x0, t), t), t ~ U[0, T); writes OUT/classifier.* and OUT/log.jsonl."""
    if cfg.steps < 1:
        raise ValueError(f"steps must be >= 1, got {cfg.steps}")
    out = Path(out)
    acc = make_accelerator()
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    cfg.net.num_outputs = int(cfg.net.num_outputs)
    if labels_t.min() < 0 or labels_t.max() >= cfg.net.num_outputs:
        raise MinorityError(f"labels must lie in [0, {cfg.net.num_outputs})")
    cfg.net.num_classes = len(data.class_names) if class_cond else 0
    cfg.net.T = schedule.T
    train_idx, val_idx = split_holdout(len(data), cfg.holdout, cfg.seed)
    # evaluated: at most MAX_EVAL held-out images, a fixed subset (a streamed set decodes them at each evaluation)
    eval_idx = val_idx if len(val_idx) <= MAX_EVAL else val_idx[torch.randperm(
        len(val_idx), generator=torch.Generator().manual_seed(cfg.seed + 1))[:MAX_EVAL].sort().values]
    cls = data.class_ids if class_cond else None
    torch.manual_seed(cfg.seed)
    net = NoiseConditionedClassifier(cfg.net)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    net, opt = acc.prepare(net, opt)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + acc.process_index + 1)
    abar = schedule.abar.to(acc.device)
    log_path = out / "log.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    log_lines: list[str] = []
    metrics: dict = {}
    bad = 0
    step = 0
    while step < cfg.steps:
        pick = train_idx[torch.randint(0, len(train_idx), (cfg.batch_size,), generator=gen)]
        x0 = to_model_range(data.images[pick]).to(acc.device)
        t = torch.randint(0, schedule.T, (cfg.batch_size,), generator=gen).to(acc.device)
        eps = torch.randn(x0.shape, generator=gen).to(acc.device)
        a = abar[t].float().view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps  # Eq. 1
        for g in opt.param_groups:
            g["lr"] = cfg.lr * (1 - step / cfg.steps)  # linear anneal
        with acc.autocast():
            logits = net(x_t, t, cls[pick].to(acc.device) if cls is not None else None)
            loss = F.cross_entropy(logits.float(), labels_t[pick].to(acc.device))
        bad = _check_finite(loss.detach(), bad, step)
        if bad:
            opt.zero_grad(set_to_none=True)
            continue
        acc.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        metrics = {"step": step, "loss": float(loss.detach())}
        if acc.is_main_process and (step % cfg.eval_every == 0 or step == cfg.steps):
            raw = acc.unwrap_model(net).eval()
            metrics.update(evaluate_classifier(raw, schedule, data.images[eval_idx], labels_t[eval_idx],
                                               cls[eval_idx] if cls is not None else None, cfg.seed))
            raw.train()
            log_lines.append(json.dumps(metrics))
        if progress is not None and acc.is_main_process:
            progress(step, cfg.steps, metrics)
    if acc.is_main_process:
        from core.nets.checkpoint import atomic_write_text

        raw = acc.unwrap_model(net).eval()
        final = {k: v for k, v in metrics.items() if k.startswith("val_")}
        info = {**extra, "steps": step, "num_train": len(train_idx), "num_val": len(val_idx),
                "num_val_evaluated": len(eval_idx),
                "class_cond": class_cond, "class_names": data.class_names, "metrics": final,
                "train": {k: v for k, v in asdict(cfg).items() if k != "net"},
                "chance_acc": 1.0 / cfg.net.num_outputs}
        save_classifier(out, raw, thresholds, info)
        atomic_write_text(log_path, "\n".join(log_lines) + "\n")
    acc.wait_for_everyone()
    return {"steps": step, "metrics": metrics}


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lr_is_sane(lr: float) -> None:
    if not (0 < lr < 1) or math.isnan(lr):
        raise ValueError(f"lr must be in (0, 1), got {lr}")
