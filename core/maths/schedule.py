"""Noise schedules (DDPM / VP, discrete t in [0, T)), the forward process and Tweedie's formula.

Notation follows the paper: ``abar_t`` is the paper's alpha_t = prod_{s<=t} (1 - beta_s).
All per-timestep tables are float64 on the CPU; they are gathered and cast to the
input's device and dtype on use, so the same schedule serves CPU and CUDA tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("linear", "cosine")
# diffusers' DDPMScheduler variance types; "learned" is ADM's LEARNED (the output is log sigma^2), "learned_range"
# ADM's LEARNED_RANGE (an interpolation between log beta and the clipped log posterior variance)
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete variance schedule: ``betas`` and ``abar`` are float64 tensors of shape (T,)."""

    name: str
    betas: torch.Tensor
    abar: torch.Tensor

    @property
    def T(self) -> int:  # noqa: N802 - the paper's symbol
        return int(self.betas.shape[0])

    def abar_at(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """abar_t for integer timesteps ``t`` (N,), shaped (N, 1, ..., 1) to broadcast over ``like``."""
        a = self.abar.to(t.device)[t.long()]
        return a.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Eq. 1: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; x0, eps (N, ...) , t (N,) int in [0, T)."""
        abar_t = self.abar_at(t, x0)
        return abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * eps

    def tweedie_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, clip: bool = True) -> torch.Tensor:
        """Eq. 6: x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), clipped to [-1, 1] when ``clip``."""
        abar_t = self.abar_at(t, x_t)
        x0_hat = (x_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
        return x0_hat.clamp(-1, 1) if clip else x0_hat

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Inverse of Eq. 6: the noise that maps ``x0`` to ``x_t`` at timestep ``t``."""
        abar_t = self.abar_at(t, x_t)
        return (x_t - abar_t.sqrt() * x0) / (1 - abar_t).sqrt()

    def score_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """s = -eps / sqrt(1 - abar_t) (Section 2.1)."""
        return -eps / (1 - self.abar_at(t, x_t)).sqrt()

    def default_score_t(self) -> int:
        """The paper's perturbation timestep for the minority score: 0.9T (cosine) or 0.6T (linear)."""
        frac = 0.9 if self.name == "cosine" else 0.6
        return min(self.T - 1, int(round(frac * self.T)))

    def timesteps(self, num_steps: int) -> torch.Tensor:
        """Respaced sampling timesteps: ``num_steps`` evenly spread ints in [0, T), ascending, (num_steps,)."""
        if not 1 <= num_steps <= self.T:
            raise ValueError(f"steps must be in [1, {self.T}] for a schedule with T={self.T}, got {num_steps}")
        if num_steps == 1:
            return torch.tensor([self.T - 1], dtype=torch.long)
        # ADM's space_timesteps(T, "S"): a float stride (T-1)/(S-1) accumulated and rounded half-to-even at each
        # step, so `--steps 250` visits exactly the official scripts' timesteps (a linspace differs by one step
        # for some S, e.g. 21 of T=1000, where the accumulated sum lands just under a .5)
        stride, cur, ts = (self.T - 1) / (num_steps - 1), 0.0, []
        for _ in range(num_steps):
            ts.append(round(cur))
            cur += stride
        return torch.unique(torch.tensor(ts, dtype=torch.long))  # sorted ascending


@dataclass(frozen=True)
class RespacedSchedule:
    """The DDPM quantities on a respaced grid (ADM's SpacedDiffusion): for each kept timestep ts[k], k = 0..S-1,
    float64 (S,) tensors. ``abar_prev[0]`` is 1 (before the first kept step)."""

    timesteps: torch.Tensor  # (S,) int64, ascending
    abar: torch.Tensor  # abar at ts[k]
    abar_prev: torch.Tensor  # abar at ts[k - 1]
    betas: torch.Tensor  # respaced beta_k = 1 - abar[k] / abar_prev[k]
    posterior_variance: torch.Tensor  # beta~_k = beta_k (1 - abar_prev[k]) / (1 - abar[k]); 0 at k = 0
    posterior_log_variance_clipped: torch.Tensor  # log beta~_k with the first entry replaced by the second (ADM)


def respace(schedule: NoiseSchedule, timesteps: torch.Tensor) -> RespacedSchedule:
    """The respaced betas and posterior variances over the kept ascending ``timesteps`` (S,) int64."""
    ts = timesteps.long().cpu()
    abar = schedule.abar[ts]
    abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    betas = 1 - abar / abar_prev
    post = betas * (1 - abar_prev) / (1 - abar)
    # ADM's "clipped" log variance: beta~_0 = 0, so its log takes beta~_1 (beta_0 on a one-step grid)
    first = post[1] if len(post) > 1 else betas[0]
    log_clipped = torch.log(torch.cat([first.reshape(1), post[1:]]))
    return RespacedSchedule(ts, abar, abar_prev, betas, post, log_clipped)


def make_schedule(name: str = "linear", T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
    """Build a ``linear`` (Ho et al.) or ``cosine`` (Nichol & Dhariwal) schedule with T steps."""
    if T < 2:
        raise ValueError(f"T must be at least 2, got {T}")
    if name == "linear":
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    elif name == "cosine":
        s = 0.008

        def f(u: float) -> float:
            return math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2

        betas = torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)], dtype=torch.float64)
    else:
        raise ValueError(f"unknown schedule {name!r}; allowed: {', '.join(SCHEDULES)}")
    abar = torch.cumprod(1 - betas, dim=0)
    return NoiseSchedule(name=name, betas=betas, abar=abar)
