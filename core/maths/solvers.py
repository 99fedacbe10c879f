"""Minority guidance in diffusers' schedulers (issue 26): one wrapper around the eps-model, any solver.

Guidance enters as the score form of ADM's ``condition_score``, applied to the noise prediction before the
scheduler sees it:

    eps'(x_t, t) = eps(x_t, t) - sqrt(1 - abar_t) * w * grad_x log p(l | x_t, t)        (Eq. 8 in eps form)

with the classifier reading the model's own (integer) timestep t. Every scheduler that consumes an eps
prediction then runs guided without a line of its own. Our ADM-exact samplers (``sampling.sample_ddpm`` /
``sample_ddim``) stay the reference; ``tests/test_solvers.py`` shows diffusers' DDIM through this wrapper equals
``sample_ddim`` where the maths coincide.

Every scheduler is built from the model's own betas (``trained_betas``) with ``timestep_spacing="trailing"``:
integer timesteps that start at t = T - 1, the pure-noise end, as ADM's respacing does. x0 is clipped to
[-1, 1] where the scheduler can (DDIM, DDPM: ``clip_sample``; DPM-Solver++ and UniPC: thresholding with
``sample_max_value`` 1, which is a static clip); Euler ancestral has no clipping.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from core.maths.eps_model import predict_eps
from core.maths.schedule import VARIANCE_TYPES

# name -> (diffusers class, its extra config, whether its step draws noise (takes the generator), in words)
_SOLVERS = {
    "dpmpp-2m": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2), False,
                 "DPM-Solver++ 2M (Lu et al. 2022)"),
    "dpmpp-2m-sde": ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", solver_order=2), True,
                     "DPM-Solver++ 2M SDE"),
    "unipc": ("UniPCMultistepScheduler", dict(solver_order=2, predict_x0=True), False, "UniPC (bh2, order 2)"),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}, True, "Euler ancestral"),
    "diffusers-ddim": ("DDIMScheduler", dict(set_alpha_to_one=True), False, "diffusers' DDIM (eta 0)"),
    "diffusers-ddpm": ("DDPMScheduler", {}, True, "diffusers' DDPM (ancestral)"),
}
SOLVERS = tuple(_SOLVERS)
LEARNED_VARIANCE_SOLVERS = ("diffusers-ddpm",)  # the only one that reads a learned_range / learned output
_CLIPS = {"DDIMScheduler": "clip", "DDPMScheduler": "clip", "DPMSolverMultistepScheduler": "threshold",
          "UniPCMultistepScheduler": "threshold"}


def variance_note(name: str, variance_type: str) -> Optional[str]:
    """The one line to say when a model's learned variance is dropped by scheduler ``name`` (None otherwise)."""
    if variance_type not in ("learned_range", "learned") or name not in _SOLVERS or name in LEARNED_VARIANCE_SOLVERS:
        return None
    return (f"the model predicts a learned variance ({variance_type}); {name} cannot use it and samples with its own "
            f"fixed variance (only {', '.join(LEARNED_VARIANCE_SOLVERS)} and our ancestral sampler ddpm read it)")


def make_scheduler(name: str, schedule, steps: int, *, clip_denoised: bool = True, variance_type: str = "fixed_small"):
    """The diffusers scheduler ``name`` on ``schedule``'s own betas, ``set_timesteps(steps)`` done.
    ValueError naming the allowed values for an unknown name or steps outside [1, T]."""
    import diffusers

    if name not in _SOLVERS:
        raise ValueError(f"unknown scheduler {name!r}; allowed: {', '.join(SOLVERS)}")
    if not 1 <= int(steps) <= schedule.T:
        raise ValueError(f"steps must be in [1, {schedule.T}], got {steps}")
    cls_name, extra, _, _ = _SOLVERS[name]
    cfg = dict(num_train_timesteps=schedule.T, trained_betas=schedule.betas.tolist(), prediction_type="epsilon",
               timestep_spacing="trailing", **extra)
    clip = _CLIPS.get(cls_name)
    if clip == "clip":
        cfg["clip_sample"] = bool(clip_denoised)
    elif clip == "threshold":  # dynamic thresholding capped at 1 = a static clip of x0 to [-1, 1]
        cfg.update(thresholding=bool(clip_denoised), sample_max_value=1.0)
    if name == "diffusers-ddpm":
        cfg["variance_type"] = variance_type if variance_type in VARIANCE_TYPES else "fixed_small"  # diffusers' names
    sched = getattr(diffusers, cls_name)(**cfg)
    # diffusers takes the cumulative product of the betas in float32; our samplers use the schedule's float64 abar
    # (it matters near t = T - 1 of a cosine schedule, where abar is ~1e-9); a float32 sample stays float32
    abar = schedule.abar.to(torch.float64)
    sched.alphas_cumprod = abar
    if hasattr(sched, "lambda_t"):  # the multistep solvers' per-timestep tables, derived from abar at construction
        sched.alpha_t, sched.sigma_t = abar.sqrt(), (1 - abar).sqrt()
        sched.lambda_t = torch.log(sched.alpha_t) - torch.log(sched.sigma_t)
    sched.set_timesteps(int(steps))
    return sched


def solver_timesteps(name: str, schedule, steps: int) -> torch.Tensor:
    """The ascending (S,) int64 timesteps scheduler ``name`` visits with ``steps`` steps (trailing spacing)."""
    ts = make_scheduler(name, schedule, steps).timesteps
    return torch.as_tensor(ts).round().long().flip(0)


@dataclass
class GuidedEps:
    """The eps-model with guidance folded in (the score form of ADM ``condition_score``): called as
    ``guided(x_t, t, class_labels, index)`` on x_t (N, C, H, W), t (N,) int64 in [0, T) -> ModelOutput whose eps
    is eps - sqrt(1 - abar_t) * g(x_t, t, index) (Eq. 8); the variance output, if any, passes unchanged."""

    model: object  # eps-model with .schedule
    guidance: Optional[Callable] = None  # g(x_t, t, index) -> w grad log p (N, C, H, W)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, class_labels=None, index: Optional[int] = None):
        out = predict_eps(self.model, x_t, t, class_labels)
        if self.guidance is None:
            return out
        abar_t = self.model.schedule.abar_at(t, out.eps)
        eps = out.eps - (1 - abar_t).sqrt() * self.guidance(x_t, t, index)
        return type(out)(eps, out.variance_values)


@torch.no_grad()
def sample_scheduler(model, x_T: torch.Tensor, timesteps: torch.Tensor, *, guidance=None,
                     class_labels: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                     callback=None, clip_denoised: bool = True, name: str = "dpmpp-2m",
                     notes: Optional[list] = None) -> torch.Tensor:
    """Sampling with diffusers' scheduler ``name`` (one of SOLVERS), the samplers' shared signature: x_T (N, C, H, W)
    ~ N(0, I) (scaled by the scheduler's ``init_noise_sigma`` here), ``timesteps`` the ascending (S,) grid from
    ``solver_timesteps(name, ...)``; returns x_0 (N, C, H, W). A learned variance that the scheduler cannot use is
    dropped and said once in ``notes`` (a list the caller prints)."""
    from core.maths.sampling import SamplerStep, indexed

    variance_type = getattr(model, "variance_type", "fixed_small")
    learned = variance_type in ("learned_range", "learned")
    sched = make_scheduler(name, model.schedule, len(timesteps), clip_denoised=clip_denoised,
                           variance_type=variance_type)
    visits = torch.as_tensor(sched.timesteps).round().long()
    if not torch.equal(visits.flip(0).cpu(), timesteps.cpu().long()):
        raise ValueError(f"{name} visits its own timesteps (trailing spacing); pass solver_timesteps({name!r}, ...)")
    note = variance_note(name, variance_type)
    if note is not None and notes is not None and note not in notes:
        notes.append(note)
    eps_model = GuidedEps(model, indexed(guidance))
    n, S = x_T.shape[0], len(visits)
    x = x_T * float(sched.init_noise_sigma)
    for i, t_i in enumerate(visits.tolist()):
        t = torch.full((n,), t_i, dtype=torch.long, device=x.device)
        x_t = sched.scale_model_input(x, sched.timesteps[i])  # Euler's sigma space -> the model's x_t
        out = eps_model(x_t, t, class_labels, S - 1 - i)
        model_output = torch.cat([out.eps, out.variance_values], 1) if learned and name in LEARNED_VARIANCE_SOLVERS \
            else out.eps
        kwargs = {"generator": generator} if _SOLVERS[name][2] else {}
        if name == "diffusers-ddim":
            kwargs["use_clipped_model_output"] = True  # eps re-derived from the clipped x0, as ADM's DDIM does
        x = sched.step(model_output.to(x.dtype), sched.timesteps[i], x, return_dict=False, **kwargs)[0]
        if callback is not None:
            x0_hat = model.schedule.tweedie_x0(x_t, t, out.eps, clip=clip_denoised)
            callback(SamplerStep(i, S, t_i, x, x0_hat))
    return x
