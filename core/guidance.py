"""Guidance terms: callables ``g(x_t, t) -> w * grad_x log p(. | x_t)`` that samplers add to the score.

A term never touches the sampler loop: the sampler turns the returned gradient into a mean
shift (ancestral DDPM, ADM ``condition_mean``) or an eps shift (DDIM, ADM ``condition_score``).
Terms compose by summation (Appendix D.9). Gradients flow through the classifier only, never
through the diffusion backbone.
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
