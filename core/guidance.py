"""Guidance terms: callables ``g(x_t, t) -> w * grad_x log p(. | x_t)`` that samplers add to the score.

A term never touches the sampler loop: the sampler turns the returned gradient into a mean
shift (ancestral DDPM, ADM ``condition_mean``) or an eps shift (DDIM, ADM ``condition_score``).
Terms compose by summation (Appendix D.9). Classifier terms backpropagate through the classifier
only; the self-guided term (no classifier) backpropagates through the diffusion backbone's x0_hat.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import nn


class Guidance(Protocol):
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t (N, C, H, W), t (N,) int64 in [0, T) -> scaled gradient (N, C, H, W)."""


def grad_log(log_p: Callable[[torch.Tensor], torch.Tensor], x_t: torch.Tensor) -> torch.Tensor:
    """grad_x of sum_n log_p(x)[n] at x_t; samples are independent so this is the per-sample gradient."""
    with torch.enable_grad():
        x = x_t.detach().float().requires_grad_(True)
        (g,) = torch.autograd.grad(log_p(x).sum(), x)
    return g.to(x_t.dtype)


def _labels(value, n: int, device) -> Optional[torch.Tensor]:
    if value is None:
        return None
    v = torch.as_tensor(value, dtype=torch.long, device=device)
    return v.expand(n) if v.dim() == 0 else v


@dataclass
class ClassifierGuidance:
    """Eq. 5 / Eq. 8 / Eq. 17: ``scale * grad log p_psi(target | x_t, t[, c])``.

    Minority guidance is this term with the minority classifier and ``target = minority_class``;
    an extra class classifier (Appendix D.9) is the same term with a class classifier.
    """

    classifier: nn.Module  # logits (N, K) = classifier(x_t, t, class_labels)
    target: int | torch.Tensor  # class index in [0, K), scalar or (N,)
    scale: float  # w >= 0
    class_labels: Optional[int | torch.Tensor] = None  # c for class-conditional classifiers (Eq. 17)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = x_t.shape[0]
        target = _labels(self.target, n, x_t.device)
        c = _labels(self.class_labels, n, x_t.device)

        def log_p(x):
            logp = torch.log_softmax(self.classifier(x, t, c), dim=-1)
            return logp.gather(1, target[:, None])[:, 0]

        return self.scale * grad_log(log_p, x_t)


@dataclass
class MixtureGuidance:
    """Eq. 18 (Appendix D.5): ``scale * grad log sum_i tau_i p_psi(l = i | x_t)``, tau = the L thresholds."""

    classifier: nn.Module
    thresholds: Sequence[float]  # tau_0 .. tau_{L-1}, positive
    scale: float
    class_labels: Optional[int | torch.Tensor] = None

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        log_tau = torch.log(torch.as_tensor(list(self.thresholds), dtype=torch.float32, device=x_t.device).clamp_min(1e-12))
        c = _labels(self.class_labels, x_t.shape[0], x_t.device)

        def log_l_hat(x):
            return torch.logsumexp(torch.log_softmax(self.classifier(x, t, c), dim=-1) + log_tau, dim=-1)

        return self.scale * grad_log(log_l_hat, x_t)


@dataclass
class GuidanceSum:
    """Several guidance terms added together (e.g. minority + an extra class classifier, D.9)."""

    terms: tuple

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        total = self.terms[0](x_t, t)
        for term in self.terms[1:]:
            total = total + term(x_t, t)
        return total


def combine(*terms) -> Optional[Guidance]:
    """Sum the given terms, dropping ``None`` and those with scale 0; ``None`` when nothing is left.

    Dropping zero-scale terms makes ``scale=0`` run exactly the unguided sampler (and at its cost).
    """
    for term in terms:
        if term is not None and getattr(term, "scale", 1.0) < 0:
            raise ValueError(f"guidance scale must be >= 0, got {term.scale}")
    live = tuple(t for t in terms if t is not None and getattr(t, "scale", 1.0) != 0)
    if not live:
        return None
    return live[0] if len(live) == 1 else GuidanceSum(live)


@dataclass
class SelfGuidance:
    """Self-guided minority sampling (Um & Ye, ECCV 2024), a classifier-free guidance term.

    At every ``interval``-th sampler step: x0_hat = Tweedie(x_t) with grad, re-noise it to t' = p T and
    denoise again without grad (x0_hat'), and return ``scale * g / max|g|`` (per sample) with
    g = grad_x d(x0_hat, x0_hat'): a large discrepancy means x0_hat is far from what the model
    reproduces, i.e. a low-density (minority) feature. Other steps return zeros. The step count
    restarts whenever t stops decreasing (a new trajectory); the re-noising draws come from a generator
    seeded by ``seed`` at each restart, so runs are reproducible.
    """

    model: nn.Module  # eps-model with .schedule
    scale: float  # >= 0
    distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (N, C, H, W) x2 in [-1, 1] -> (N,)
    p: float = 0.8  # t' = p T
    interval: int = 5  # guide every k-th step (k = 1: every step)
    seed: int = 0
    clip: bool = True  # clip x0_hat to [-1, 1] as the sampler does
    class_labels: Optional[int | torch.Tensor] = None

    def __post_init__(self):
        if not 0 < self.p < 1:
            raise ValueError(f"p must be in (0, 1), got {self.p}")
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")
        self._last_t, self._count, self._gen = None, 0, None

    def target(self, x0_hat: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x0_hat' (no grad): x0_hat (N, C, H, W) in [-1, 1] re-noised to t' = p T with ``noise`` and denoised."""
        sch = self.model.schedule
        tp = torch.full((x0_hat.shape[0],), min(int(round(self.p * sch.T)), sch.T - 1), dtype=torch.long,
                        device=x0_hat.device)
        c = _labels(self.class_labels, x0_hat.shape[0], x0_hat.device)
        with torch.no_grad():
            x_tp = sch.q_sample(x0_hat, tp, noise)
            return sch.tweedie_x0(x_tp, tp, self.model(x_tp, tp, c), clip=self.clip)

    def raw_gradient(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(grad_x d(x0_hat(x_t), x0_hat') (N, C, H, W), d (N,)); x0_hat' is a constant (no grad through it)."""
        c = _labels(self.class_labels, x_t.shape[0], x_t.device)
        with torch.enable_grad():
            x = x_t.detach().float().requires_grad_(True)
            x0_hat = self.model.schedule.tweedie_x0(x, t, self.model(x, t, c), clip=self.clip)  # Eq. 6, with grad
            ms = self.distance(x0_hat, self.target(x0_hat.detach(), noise))
            (g,) = torch.autograd.grad(ms.sum(), x)
        return g.to(x_t.dtype), ms.detach()

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t0 = int(t.reshape(-1)[0])
        if self._last_t is None or t0 >= self._last_t:  # a new trajectory
            self._count, self._gen = 0, torch.Generator().manual_seed(self.seed)
        self._last_t = t0
        step, self._count = self._count, self._count + 1
        if step % self.interval:
            return torch.zeros_like(x_t)
        noise = torch.randn(x_t.shape, generator=self._gen, dtype=torch.float32).to(x_t.device, x_t.dtype)
        g, _ = self.raw_gradient(x_t, t, noise)
        peak = g.abs().flatten(1).amax(1).clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))
        return self.scale * g / peak  # per-sample max normalisation
