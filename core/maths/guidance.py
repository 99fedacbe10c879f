"""Guidance terms: callables ``g(x_t, t, index) -> w * grad_x log p(. | x_t)`` that samplers add to the score.

``index`` is the sampler's respaced step index (S-1 at the noisiest step, 0 at the last, as ADM's loop
counts); terms that guide only some steps (self-guidance) read it, the others ignore it.

A term never touches the sampler loop: the sampler turns the returned gradient into a mean
shift (ancestral DDPM, ADM ``condition_mean``) or an eps shift (DDIM, ADM ``condition_score``).
Terms compose by summation (Appendix D.9). Classifier terms backpropagate through the classifier
only; the self-guided term (no classifier) backpropagates through the diffusion backbone's x0_hat.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional, Protocol, Sequence

import torch
from torch import nn


class Guidance(Protocol):
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, index: Optional[int] = None) -> torch.Tensor:
        """x_t (N, C, H, W), t (N,) int64 in [0, T), index: respaced step (0 = last) -> scaled gradient (N, C, H, W)."""


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
    target: int | torch.Tensor  # class index in [0, K), scalar or (N,) (one class per sample, e.g. l ~ U{a..b})
    scale: float  # w >= 0
    class_labels: Optional[int | torch.Tensor] = None  # c for class-conditional classifiers (Eq. 17)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, index: Optional[int] = None) -> torch.Tensor:
        n = x_t.shape[0]
        target = _labels(self.target, n, x_t.device)
        c = _labels(self.class_labels, n, x_t.device)

        def log_p(x):
            logp = torch.log_softmax(self.classifier(x, t, c), dim=-1)
            return logp.gather(1, target[:, None])[:, 0]

        return self.scale * grad_log(log_p, x_t)


def minority_targets(spec: Optional[str], n: int, seed: int, L: int) -> torch.Tensor:
    """--minority-class: one integer l; a range A-B from which each sample's class is drawn uniformly (the
    paper's l ~ U{A..B}); ``all``, the range 0-(L-1) (the official script's draw when no class is set); or
    None, the rarest class L-1 (the default). Ranges are seeded, so a sample's class does not depend on batch
    size or processes. (n,) int64."""
    if spec is None:
        return torch.full((n,), L - 1, dtype=torch.long)
    if str(spec).strip().lower() == "all":
        spec = f"0-{L - 1}"
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", str(spec))
    try:
        lo, hi = (int(m.group(1)), int(m.group(2))) if m else (int(spec), int(spec))
    except ValueError:
        raise ValueError(f"--minority-class must be an integer l, a range A-B or all, got {spec!r}") from None
    if lo > hi:
        raise ValueError(f"--minority-class range {spec!r} runs backwards: A must be <= B (write {hi}-{lo})")
    if not 0 <= lo <= hi < L:
        raise ValueError(f"--minority-class must be in [0, {L}) for this classifier (L={L}), got {spec}")
    if lo == hi:
        return torch.full((n,), lo, dtype=torch.long)
    g = torch.Generator().manual_seed((seed * 1_000_003 + 7_777_777) % (2 ** 63))
    return torch.randint(lo, hi + 1, (n,), generator=g)


@dataclass
class MixtureGuidance:
    """Eq. 18 (Appendix D.5): ``scale * grad log sum_i tau_i p_psi(l = i | x_t)``, tau = the L thresholds."""

    classifier: nn.Module
    thresholds: Sequence[float]  # tau_0 .. tau_{L-1}, positive
    scale: float
    class_labels: Optional[int | torch.Tensor] = None

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, index: Optional[int] = None) -> torch.Tensor:
        log_tau = torch.log(torch.as_tensor(list(self.thresholds), dtype=torch.float32, device=x_t.device).clamp_min(1e-12))
        c = _labels(self.class_labels, x_t.shape[0], x_t.device)

        def log_l_hat(x):
            return torch.logsumexp(torch.log_softmax(self.classifier(x, t, c), dim=-1) + log_tau, dim=-1)

        return self.scale * grad_log(log_l_hat, x_t)


@dataclass
class GuidanceSum:
    """Several guidance terms added together (e.g. minority + an extra class classifier, D.9)."""

    terms: tuple

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, index: Optional[int] = None) -> torch.Tensor:
        total = self.terms[0](x_t, t, index)
        for term in self.terms[1:]:
            total = total + term(x_t, t, index)
        return total


def defined_for(guidance) -> Optional[tuple]:
    """The samplers a guidance is defined for (None: every sampler, as for the classifier terms); a sum is defined
    where all of its terms are."""
    if guidance is None:
        return None
    parts = guidance.terms if isinstance(guidance, GuidanceSum) else (guidance,)
    allowed = None
    for term in parts:
        own = getattr(term, "SAMPLERS", None)
        if own is not None:
            allowed = tuple(s for s in (allowed or own) if s in own)
    return allowed


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

    At every respaced step index i with ``i % interval == 0`` (the official loop's test; i counts down to 0,
    so the last step is one of them): x0_hat = Tweedie(x_t) with grad, not clipped (the official
    ``mg_clip_denoised=False``), re-noised to t' = p T and denoised again without grad (x0_hat'); return
    ``scale * g / max|g|`` (per sample) with g = grad_x d(x0_hat, x0_hat'): a large discrepancy means x0_hat
    is far from what the model reproduces, i.e. a low-density (minority) feature. The ancestral sampler
    scales it by the step's variance (the official ``mg_scale_type='var'``); DDIM, which the official code
    does not guide, shifts eps by sqrt(1 - abar_t) times it. Other steps return zeros. The re-noising
    draws come from a generator seeded by ``seed`` at each new trajectory (the index stops decreasing), so
    runs are reproducible.
    """

    # the samplers it is defined for: it reads the respaced index and is scaled by the ancestral step's variance
    # (DDIM: the eps form); a diffusers scheduler is refused (issue 26)
    SAMPLERS: ClassVar[tuple] = ("ddpm", "ddim")

    model: nn.Module  # eps-model with .schedule
    scale: float  # >= 0
    distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (N, C, H, W) x2 in [-1, 1] -> (N,)
    p: float = 0.8  # t' = p T
    interval: int = 5  # guide when the respaced index is a multiple of k (k = 1: every step)
    seed: int = 0
    clip: bool = False  # clip x0_hat to [-1, 1] inside the guidance (official default: no)
    class_labels: Optional[int | torch.Tensor] = None
    count_from: str = "last"  # "last": guide when index % k == 0 (official); "first": every k-th step from the first

    def __post_init__(self):
        if not 0 < self.p < 1:
            raise ValueError(f"p must be in (0, 1), got {self.p}")
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")
        if self.count_from not in ("last", "first"):
            raise ValueError(f"count_from must be one of last, first, got {self.count_from!r}")
        self._last_index, self._first_index, self._gen = None, None, None

    def guides(self, index: int) -> bool:
        """Whether the step at respaced index ``index`` (0 = last) is guided."""
        steps = index if self.count_from == "last" else self._first_index - index
        return steps % self.interval == 0

    def target(self, x0_hat: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x0_hat' (no grad): x0_hat (N, C, H, W) re-noised to t' = p T with ``noise`` and denoised (clipped as
        ``clip`` says)."""
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

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, index: Optional[int] = None) -> torch.Tensor:
        if index is None:
            raise ValueError("SelfGuidance needs the sampler's respaced step index (samplers pass it)")
        if self._last_index is None or index >= self._last_index:  # a new trajectory
            self._gen, self._first_index = torch.Generator().manual_seed(self.seed), index
        self._last_index = index
        if not self.guides(index):
            return torch.zeros_like(x_t)
        noise = torch.randn(x_t.shape, generator=self._gen, dtype=torch.float32).to(x_t.device, x_t.dtype)
        g, _ = self.raw_gradient(x_t, t, noise)
        peak = g.abs().flatten(1).amax(1).clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))
        return self.scale * g / peak  # per-sample max normalisation
