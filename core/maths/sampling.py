"""Ancestral DDPM and DDIM samplers over an eps-model, with guidance as a separate term.

Both samplers share one signature:
    ``sampler(model, x_T, timesteps, *, guidance, class_labels, generator, callback, clip_denoised)``
``timesteps`` is an ascending (S,) int64 tensor of respaced timesteps from ``schedule.timesteps(S)``.
Randomness comes only from ``generator`` (a CPU torch.Generator); noise is drawn on the CPU and
moved to the model's device, so a seed gives the same noise on every device.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from core.maths.guidance import Guidance, defined_for
from core.maths.eps_model import predict_eps
from core.maths.schedule import VARIANCE_TYPES, RespacedSchedule, respace
from core.maths.solvers import SOLVERS, sample_scheduler, solver_timesteps

REFERENCE_SAMPLERS = ("ddim", "ddpm")  # ours, ADM-exact
SAMPLERS = REFERENCE_SAMPLERS + SOLVERS  # and diffusers' schedulers through the guided-eps wrapper (issue 26)


@dataclass(frozen=True)
class BoostSkip:
    """Boost-and-Skip (Um & Ye, ICML 2025), an initialisation term: start from ``gamma`` * N(0, I) and skip
    the first ``skip`` steps of the (respaced) sampling schedule. gamma = 1, skip = 0 is the standard start.
    Defined for our samplers (its paper's is ancestral); a diffusers scheduler keeps its own grid and is refused."""

    SAMPLERS = REFERENCE_SAMPLERS

    gamma: float = 1.0  # > 0; the paper uses 2.5 .. 4.0
    skip: int = 0  # Delta_t >= 0 steps dropped from the noisy end

    def __call__(self, x_T: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_T (N, C, H, W) ~ N(0, I), timesteps (S,) ascending -> (boosted x_T, the kept timesteps)."""
        if self.gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        if not 0 <= self.skip < len(timesteps):
            raise ValueError(f"skip must be in [0, {len(timesteps) - 1}] for {len(timesteps)} steps, got {self.skip}")
        kept = timesteps[:len(timesteps) - self.skip]
        return (x_T if self.gamma == 1 else self.gamma * x_T), kept


@dataclass(frozen=True)
class SamplerStep:
    """What a sampler reports after each step: ``x0_hat`` (N, C, H, W) in [-1, 1] is the current denoised estimate."""

    index: int  # 0-based step count
    total: int  # number of steps
    t: int  # timestep just denoised
    x_t: torch.Tensor
    x0_hat: torch.Tensor


StepCallback = Callable[[SamplerStep], None]


def _randn_like(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)


def indexed(guidance: Optional[Guidance]) -> Optional[Guidance]:
    """The guidance as ``g(x_t, t, index)``: a two-argument callable ``g(x_t, t)`` (the protocol before the
    respaced index was passed) is wrapped, so guidance terms written for it keep working."""
    if guidance is None:
        return None
    try:
        params = list(inspect.signature(guidance).parameters.values())
    except (TypeError, ValueError):  # no signature to read: assume the current protocol
        return guidance
    if any(p.kind is p.VAR_POSITIONAL for p in params) or \
            sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) >= 3:
        return guidance
    return lambda x_t, t, index: guidance(x_t, t)


def ddpm_variance(variance_type: str, rs: RespacedSchedule, k: int, v: Optional[torch.Tensor]):
    """sigma^2 of the ancestral step at respaced index k (ADM ``p_mean_variance``): a float for the fixed types,
    a tensor like ``v`` (the model's variance output, (N, C, H, W)) for the learned ones."""
    if variance_type in ("fixed_small", "fixed_small_log"):  # the posterior variance beta~ (0 at the last step)
        return float(rs.posterior_variance[k])
    if variance_type in ("fixed_large", "fixed_large_log"):  # beta, with beta~_1 in place of beta_0 (ADM)
        return float(rs.posterior_variance[1] if k == 0 and len(rs.betas) > 1 else rs.betas[k])
    if v is None:
        raise ValueError(f"variance_type {variance_type!r} needs the model's variance output (2C output channels)")
    if variance_type == "learned_range":
        # frac = (v + 1) / 2 (not clamped): log sigma^2 = frac log beta_k + (1 - frac) log beta~_k (clipped)
        frac = (v + 1) / 2
        return torch.exp(frac * math.log(float(rs.betas[k])) + (1 - frac) * float(rs.posterior_log_variance_clipped[k]))
    if variance_type == "learned":  # ADM LEARNED: the output is log sigma^2 itself
        return torch.exp(v)
    raise ValueError(f"unknown variance_type {variance_type!r}; allowed: {', '.join(VARIANCE_TYPES)}")


@torch.no_grad()
def sample_ddpm(model, x_T: torch.Tensor, timesteps: torch.Tensor, *, guidance: Optional[Guidance] = None,
                class_labels: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                callback: Optional[StepCallback] = None, clip_denoised: bool = True) -> torch.Tensor:
    """Ancestral sampling (Eq. 3 with the posterior std as noise scale, as DESIGN notes; a learned variance when
    the model has one, ``model.variance_type``); returns x_0 (N, C, H, W)."""
    x = x_T
    n = x.shape[0]
    rs = respace(model.schedule, timesteps)
    variance_type = getattr(model, "variance_type", "fixed_small")
    guidance = indexed(guidance)
    for i, k in enumerate(range(len(timesteps) - 1, -1, -1)):
        t = torch.full((n,), int(timesteps[k]), dtype=torch.long, device=x.device)
        abar_t, abar_prev, beta_t = float(rs.abar[k]), float(rs.abar_prev[k]), float(rs.betas[k])
        # Tweedie's denoised estimate (Eq. 6), clipped to the data range
        out = predict_eps(model, x, t, class_labels)
        eps, v = out.eps, out.variance_values
        x0_hat = model.schedule.tweedie_x0(x, t, eps, clip=clip_denoised)
        # posterior q(x_{t-1} | x_t, x0_hat): mean; variance fixed or learned
        mean = (abar_prev ** 0.5 * beta_t / (1 - abar_t)) * x0_hat \
            + ((1 - beta_t) ** 0.5 * (1 - abar_prev) / (1 - abar_t)) * x
        var = ddpm_variance(variance_type, rs, k, v)
        # Eq. 8 as a mean shift: mean + Sigma_t * w grad log p(l | x_t) (ADM condition_mean; zero when Sigma is)
        if guidance is not None and (torch.is_tensor(var) or var > 0):
            mean = mean + var * guidance(x, t, k)
        x = mean + var ** 0.5 * _randn_like(x, generator) if k > 0 else mean
        if callback is not None:
            callback(SamplerStep(i, len(timesteps), int(timesteps[k]), x, x0_hat))
    return x


@torch.no_grad()
def sample_ddim(model, x_T: torch.Tensor, timesteps: torch.Tensor, *, guidance: Optional[Guidance] = None,
                class_labels: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                callback: Optional[StepCallback] = None, clip_denoised: bool = True, eta: float = 0.0) -> torch.Tensor:
    """DDIM (Song et al. 2021) with noise level ``eta`` in [0, 1]; returns x_0 (N, C, H, W)."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    x = x_T
    n = x.shape[0]
    rs = respace(model.schedule, timesteps)
    guidance = indexed(guidance)
    for i, k in enumerate(range(len(timesteps) - 1, -1, -1)):
        t = torch.full((n,), int(timesteps[k]), dtype=torch.long, device=x.device)
        abar_t, abar_prev = float(rs.abar[k]), float(rs.abar_prev[k])
        # Tweedie (Eq. 6), clipped; eps re-derived so that it agrees with the clipped x0_hat
        x0_hat = model.schedule.tweedie_x0(x, t, model(x, t, class_labels), clip=clip_denoised)
        eps = model.schedule.eps_from_x0(x, t, x0_hat)
        # Eq. 8 in eps form, in ADM's order (condition_score): s_hat = s + w grad  <=>
        # eps_hat = eps - sqrt(1 - abar_t) w grad, and x0_hat rebuilt from eps_hat without a second clip,
        # i.e. x0_hat + (1 - abar_t) / sqrt(abar_t) * w grad
        if guidance is not None:
            g = guidance(x, t, k)
            eps = eps - (1 - abar_t) ** 0.5 * g
            x0_hat = x0_hat + ((1 - abar_t) / abar_t ** 0.5) * g
        sigma = eta * ((1 - abar_prev) / (1 - abar_t)) ** 0.5 * (1 - abar_t / abar_prev) ** 0.5
        x = abar_prev ** 0.5 * x0_hat + max(1 - abar_prev - sigma ** 2, 0.0) ** 0.5 * eps
        if sigma > 0 and k > 0:
            x = x + sigma * _randn_like(x, generator)
        if callback is not None:
            callback(SamplerStep(i, len(timesteps), int(timesteps[k]), x, x0_hat))
    return x


def sample(model, n: int, *, steps: int = 50, sampler: str = "ddim", eta: float = 0.0,
           guidance: Optional[Guidance] = None, class_labels: Optional[torch.Tensor] = None,
           generator: Optional[torch.Generator] = None, callback: Optional[StepCallback] = None,
           clip_denoised: bool = True, init: Optional[BoostSkip] = None, notes: Optional[list] = None) -> torch.Tensor:
    """Draw ``n`` images (n, C, H, W) in [-1, 1] from x_T ~ N(0, I) with the named sampler (ours: ddpm, ddim; or a
    diffusers scheduler of ``solvers.SOLVERS``); ``init`` may change the start (Boost-and-Skip) before the loop
    runs; ``notes`` (a list) collects what the caller should say once (a learned variance a scheduler drops)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
    allowed = defined_for(guidance)
    if allowed is not None and sampler not in allowed:
        raise ValueError(f"self-guided minority sampling is defined for the samplers {', '.join(allowed)}, "
                         f"not for {sampler}")
    if init is not None and sampler not in BoostSkip.SAMPLERS:
        raise ValueError(f"Boost-and-Skip is defined for the samplers {', '.join(BoostSkip.SAMPLERS)}, not for {sampler}")
    timesteps = solver_timesteps(sampler, model.schedule, steps) if sampler in SOLVERS else model.schedule.timesteps(steps)
    device = model.device
    shape = (n, model.channels, model.image_size, model.image_size)
    x_T = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    if init is not None:
        x_T, timesteps = init(x_T, timesteps)
    if class_labels is not None:
        class_labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).expand(n)
    kwargs = dict(guidance=guidance, class_labels=class_labels, generator=generator, callback=callback,
                  clip_denoised=clip_denoised)
    if sampler in SOLVERS:
        return sample_scheduler(model, x_T, timesteps, name=sampler, notes=notes, **kwargs)
    if sampler == "ddim":
        return sample_ddim(model, x_T, timesteps, eta=eta, **kwargs)
    return sample_ddpm(model, x_T, timesteps, **kwargs)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> numpy uint8 (N, H, W, C)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
