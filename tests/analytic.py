"""Closed-form diffusion models for honest tests (DESIGN.md section 5).

Data x0 ~ sum_k pi_k N(mu_k, s^2 I) in R^D, laid out as (N, D, 1, 1) tensors. At timestep t,
x_t | k ~ N(sqrt(abar_t) mu_k, v_t I) with v_t = abar_t s^2 + 1 - abar_t, so the score, the optimal
eps-model and the component posterior p(k | x_t) are all analytic.
"""
from __future__ import annotations

import torch
from torch import nn

from core.maths.schedule import make_schedule


class AnalyticMixture(nn.Module):
    def __init__(self, means, weights, std: float, schedule=None):
        super().__init__()
        self.register_buffer("means", torch.as_tensor(means, dtype=torch.float64))  # (K, D)
        self.register_buffer("log_w", torch.log(torch.as_tensor(weights, dtype=torch.float64)))  # (K,)
        self.std = std
        self.schedule = schedule or make_schedule("linear", 1000)
        self.channels = self.means.shape[1]
        self.image_size = 1
        self.num_classes = 0
        self.device = torch.device("cpu")

    def _parts(self, x_t, t):
        abar = self.schedule.abar[t.long()].to(torch.float64)[:, None, None]  # (N,1,1)
        x = x_t.reshape(x_t.shape[0], -1).to(torch.float64)[:, None, :]  # (N,1,D)
        centred = x - abar.sqrt() * self.means[None]  # (N,K,D)
        v = abar * self.std ** 2 + 1 - abar  # (N,1,1)
        d = x.shape[-1]
        log_joint = self.log_w[None] - (centred ** 2).sum(-1) / (2 * v[:, :, 0]) - 0.5 * d * torch.log(v[:, :, 0])
        return abar, centred, v, log_joint

    def posterior_logits(self, x_t, t, class_labels=None):
        """log pi_k + log N(x_t; ...) (N, K): log_softmax gives log p(k | x_t)."""
        return self._parts(x_t, t)[3].to(x_t.dtype)

    def forward(self, x_t, t, class_labels=None):
        abar, centred, v, log_joint = self._parts(x_t, t)
        r = torch.softmax(log_joint, dim=1)[:, :, None]  # (N,K,1)
        score = -(r * centred / v).sum(1)  # (N,D)
        eps = -(1 - abar[:, 0]).sqrt() * score
        return eps.to(x_t.dtype).reshape(x_t.shape)

    def posterior_mean(self, x_t, t):
        """E[x0 | x_t], computed from the Gaussian posterior per component (not from Tweedie)."""
        abar, centred, v, log_joint = self._parts(x_t, t)
        r = torch.softmax(log_joint, dim=1)[:, :, None]
        gain = abar.sqrt() * self.std ** 2 / v
        post_k = self.means[None] + gain * centred  # (N,K,D)
        return (r * post_k).sum(1).to(x_t.dtype).reshape(x_t.shape)


class PosteriorClassifier(nn.Module):
    """The exact component classifier p(k | x_t) of an AnalyticMixture, as logits."""

    def __init__(self, mixture: AnalyticMixture):
        super().__init__()
        self.mixture = mixture

    def forward(self, x_t, t, class_labels=None):
        return self.mixture.posterior_logits(x_t, t)
