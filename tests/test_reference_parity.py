"""Issue 15: where the samplers follow ADM / the official code, checked in closed form.

- Learned-variance models keep their variance (ADM ``p_mean_variance`` with LEARNED_RANGE / LEARNED): a
  variance output of +1 samples with sigma^2 = beta_k, -1 with the clipped posterior variance beta~_k, both
  over the respaced betas; the guidance shift uses the same sigma^2.
- DDIM guidance in ADM's order (``condition_score``): eps from the clipped x0_hat, shifted, x0_hat rebuilt
  without a second clip.
"""
import json
import math

import pytest
import torch
from torch import nn

from analytic import AnalyticMixture
from core.nets.models import DiffusionModel, UNetConfig, load_diffusion, variance_type_for
from core.maths.sampling import ddpm_variance, sample, sample_ddim, sample_ddpm
from core.maths.schedule import VARIANCE_TYPES, make_schedule, respace


class _Out:
    def __init__(self, sample):
        self.sample = sample


class ConstantNet(nn.Module):
    """A 'UNet' whose output is [eps = a x_t, v = const]: 2C channels, as ADM learn_sigma models."""

    def __init__(self, v: float, a: float = 0.1):
        super().__init__()
        self.v, self.a = v, a
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x, t, class_labels=None):
        return _Out(torch.cat([self.a * x, torch.full_like(x, self.v)], dim=1))


def _model(v, variance_type="learned_range", T=1000):
    return DiffusionModel(ConstantNet(v), make_schedule("linear", T), 4, 1, variance_type=variance_type)


def _independent_respacing(schedule, ts):
    """beta_k and beta~_k of the respaced grid written out from abar directly (not via core.maths.schedule.respace)."""
    abar = [float(schedule.abar[int(t)]) for t in ts]
    prev = [1.0] + abar[:-1]
    beta = [1 - a / p for a, p in zip(abar, prev)]
    post = [b * (1 - p) / (1 - a) for b, a, p in zip(beta, abar, prev)]
    return abar, prev, beta, post


def _manual_ddpm(model, x_T, ts, generator, var_of_k, guidance=None):
    """The ancestral loop written out for eps = a x (no clipping reached at these scales)."""
    abar, prev, beta, _ = _independent_respacing(model.schedule, ts)
    x = x_T.double()
    for k in range(len(ts) - 1, -1, -1):
        eps = model.net.a * x
        x0 = ((x - math.sqrt(1 - abar[k]) * eps) / math.sqrt(abar[k])).clamp(-1, 1)
        mean = (math.sqrt(prev[k]) * beta[k] / (1 - abar[k])) * x0 + (math.sqrt(1 - beta[k]) * (1 - prev[k]) / (1 - abar[k])) * x
        var = var_of_k(k)
        if guidance is not None:
            mean = mean + var * guidance
        z = torch.randn(x.shape, generator=generator, dtype=torch.float32).double()
        x = mean + math.sqrt(var) * z if k > 0 else mean
    return x


@pytest.mark.parametrize("steps", [1, 2, 7, 50])
def test_respaced_variances_match_the_formulas(steps):
    sch = make_schedule("linear", 1000)
    ts = sch.timesteps(steps)
    rs = respace(sch, ts)
    _, _, beta, post = _independent_respacing(sch, ts)
    torch.testing.assert_close(rs.betas, torch.tensor(beta, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(rs.posterior_variance, torch.tensor(post, dtype=torch.float64), rtol=1e-12, atol=1e-300)
    assert float(rs.posterior_variance[0]) == 0.0
    first = post[1] if steps > 1 else beta[0]  # ADM: log beta~ with its first entry replaced by the second
    assert float(rs.posterior_log_variance_clipped[0]) == pytest.approx(math.log(first), rel=1e-12)
    for k in range(1, steps):
        assert float(rs.posterior_log_variance_clipped[k]) == pytest.approx(math.log(post[k]), rel=1e-12)


def test_learned_range_plus_one_is_beta_minus_one_is_clipped_posterior_variance():
    sch = make_schedule("linear", 1000)
    ts = sch.timesteps(10)
    rs = respace(sch, ts)
    _, _, beta, post = _independent_respacing(sch, ts)
    v = torch.ones(1, 1, 2, 2)
    for k in range(10):
        clipped = post[1] if k == 0 else post[k]
        hi = ddpm_variance("learned_range", rs, k, v)
        lo = ddpm_variance("learned_range", rs, k, -v)
        mid = ddpm_variance("learned_range", rs, k, 0 * v)
        torch.testing.assert_close(hi, torch.full_like(v, beta[k]).float(), rtol=1e-6, atol=0)
        torch.testing.assert_close(lo, torch.full_like(v, clipped).float(), rtol=1e-6, atol=0)
        # the two differ exactly as log sigma^2 = frac log beta + (1 - frac) log beta~ says: ratio beta / beta~,
        # and v = 0 is their geometric mean
        assert float(hi.mean() / lo.mean()) == pytest.approx(beta[k] / clipped, rel=1e-5)
        assert float(mid.mean()) == pytest.approx(math.sqrt(beta[k] * clipped), rel=1e-5)
    # ADM's LEARNED: the output is log sigma^2
    torch.testing.assert_close(ddpm_variance("learned", rs, 3, torch.full_like(v, -4.0)), torch.full_like(v, math.exp(-4.0)))
    # the fixed types ignore any output: fixed_small is beta~ (0 at the last step), fixed_large beta (beta~_1 first)
    assert ddpm_variance("fixed_small", rs, 0, None) == 0.0 and ddpm_variance("fixed_small", rs, 4, None) == pytest.approx(post[4])
    assert ddpm_variance("fixed_large", rs, 0, None) == pytest.approx(post[1])
    assert ddpm_variance("fixed_large", rs, 4, None) == pytest.approx(beta[4])
    with pytest.raises(ValueError, match="allowed: " + ", ".join(VARIANCE_TYPES)):
        ddpm_variance("wide", rs, 1, v)


@pytest.mark.parametrize("v, which", [(1.0, "beta"), (-1.0, "posterior")])
def test_ancestral_sampler_uses_the_learned_variance_for_noise_and_guidance(v, which):
    model = _model(v)
    steps = 6
    ts = model.schedule.timesteps(steps)
    _, _, beta, post = _independent_respacing(model.schedule, ts)
    var_of_k = (lambda k: beta[k]) if which == "beta" else (lambda k: post[1] if k == 0 else post[k])
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    got = sample_ddpm(model, x_T, ts, generator=torch.Generator().manual_seed(2))
    want = _manual_ddpm(model, x_T, ts, torch.Generator().manual_seed(2), var_of_k)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    # a constant guidance term shifts the mean by sigma^2 * g at every step (the last one too: sigma^2 > 0)
    g = 0.5
    got = sample_ddpm(model, x_T, ts, guidance=lambda x, t, i: torch.full_like(x, g),
                      generator=torch.Generator().manual_seed(2))
    want = _manual_ddpm(model, x_T, ts, torch.Generator().manual_seed(2), var_of_k, guidance=g)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_fixed_variance_model_drops_the_second_half_and_ddim_ignores_the_variance():
    fixed = _model(1.0, "fixed_small")
    learned = _model(1.0, "learned_range")
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    ts = fixed.schedule.timesteps(5)
    assert fixed.predict(x_T, torch.zeros(2, dtype=torch.long)).variance_values is None
    a = sample_ddim(fixed, x_T, ts)
    b = sample_ddim(learned, x_T, ts)
    assert torch.equal(a, b)  # DDIM uses eps only
    c = sample_ddpm(fixed, x_T, ts, generator=torch.Generator().manual_seed(0))
    d = sample_ddpm(learned, x_T, ts, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(c, d)  # the ancestral sampler does not


def test_variance_type_is_read_from_the_scheduler_config(tmp_path):
    assert variance_type_for({}, 3, 3, "m") == "fixed_small"
    assert variance_type_for({}, 3, 6, "m") == "learned_range"  # ADM learn_sigma without a config entry
    assert variance_type_for({"variance_type": "learned"}, 3, 6, "m") == "learned"
    from core.errors import CheckpointError

    with pytest.raises(CheckpointError, match="allowed: fixed_small, fixed_small_log, fixed_large, fixed_large_log, "
                                              "learned, learned_range"):
        variance_type_for({"variance_type": "wide"}, 3, 6, "m")
    with pytest.raises(CheckpointError, match="needs 6 output channels"):
        variance_type_for({"variance_type": "learned_range"}, 3, 3, "m")
    # a real diffusers folder with 2C outputs and variance_type learned_range
    from diffusers import UNet2DModel

    from core.cli import main

    kw = UNetConfig(8, 1, (8, 16), attention=False).diffusers_kwargs()
    kw["out_channels"] = 2
    torch.manual_seed(0)
    folder = tmp_path / "learned"
    UNet2DModel(**kw).save_pretrained(folder, safe_serialization=True)
    (folder / "scheduler_config.json").write_text(json.dumps({"variance_type": "learned_range"}))
    model = load_diffusion(folder)
    assert model.variance_type == "learned_range"
    out = model.predict(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    assert out.eps.shape == (2, 1, 8, 8) and out.variance_values.shape == (2, 1, 8, 8)
    assert main(["sample", "--model", str(folder), "--n", "2", "--steps", "3", "--sampler", "ddpm",
                 "--out", str(tmp_path / "x.npz")]) == 0
    (folder / "scheduler_config.json").write_text(json.dumps({"variance_type": "wide"}))
    assert main(["sample", "--model", str(folder), "--n", "2", "--steps", "3", "--out", str(tmp_path / "y.npz")]) == 2
    assert not (tmp_path / "y.npz").exists()


def test_ddim_guidance_follows_adm_condition_score():
    """x0_hat after guidance = clip(x0_hat) + (1 - abar) / sqrt(abar) * g, not clipped again; the step uses the
    guided eps = eps(clip(x0_hat)) - sqrt(1 - abar) g."""
    mix = AnalyticMixture([[0.9, 0.0]], [1.0], std=0.05)
    ts = mix.schedule.timesteps(4)
    x_T = torch.randn(5, 2, 1, 1, generator=torch.Generator().manual_seed(0))
    g = torch.tensor([2.0, -2.0]).view(1, 2, 1, 1).expand(5, 2, 1, 1)
    seen = []
    out = sample_ddim(mix, x_T, ts, guidance=lambda x, t, i: g, callback=seen.append)
    x = x_T
    for step, k in zip(seen, range(len(ts) - 1, -1, -1)):
        t = torch.full((5,), int(ts[k]), dtype=torch.long)
        a = float(mix.schedule.abar[ts[k]])
        a_prev = float(mix.schedule.abar[ts[k - 1]]) if k > 0 else 1.0
        x0 = mix.schedule.tweedie_x0(x, t, mix(x, t), clip=True)
        eps = mix.schedule.eps_from_x0(x, t, x0) - math.sqrt(1 - a) * g
        x0_guided = mix.schedule.tweedie_x0(x, t, eps, clip=False)
        torch.testing.assert_close(step.x0_hat, x0_guided, rtol=1e-5, atol=1e-6)
        x = math.sqrt(a_prev) * x0_guided + math.sqrt(1 - a_prev) * eps
        torch.testing.assert_close(step.x_t, x, rtol=1e-5, atol=1e-6)
    assert float(seen[-1].x0_hat.abs().max()) > 1.0  # strong guidance is not truncated at [-1, 1]
    torch.testing.assert_close(out, x)


def test_guided_samplers_pass_the_respaced_index():
    mix = AnalyticMixture([[0.0, 0.0]], [1.0], std=0.5)
    for sampler in ("ddim", "ddpm"):
        seen = []
        sample(mix, 2, steps=6, sampler=sampler, generator=torch.Generator().manual_seed(0),
               guidance=lambda x, t, i: (seen.append(i), torch.zeros_like(x))[1])
        assert seen == ([5, 4, 3, 2, 1, 0] if sampler == "ddim" else [5, 4, 3, 2, 1])  # fixed-small: no shift at 0


def test_two_argument_guidance_from_before_the_index_still_works():
    """A guidance callable g(x_t, t) written for the protocol before the respaced index was passed gives the same
    samples as the same term taking the index."""
    mix = AnalyticMixture([[0.5, 0.0], [-0.5, 0.0]], [0.8, 0.2], std=0.2)
    for sampler in ("ddim", "ddpm"):
        old = sample(mix, 8, steps=6, sampler=sampler, generator=torch.Generator().manual_seed(0),
                     guidance=lambda x, t: 0.3 * torch.ones_like(x))
        new = sample(mix, 8, steps=6, sampler=sampler, generator=torch.Generator().manual_seed(0),
                     guidance=lambda x, t, index: 0.3 * torch.ones_like(x))
        assert torch.equal(old, new)


def test_the_score_runs_in_fp32_whatever_the_models_precision():
    """Issue 15.7: bf16 moved the score's ranks (docs/RESULTS.md), so the score and unet-feat run in fp32 even
    when the model samples in bf16; sampling follows the model's precision."""
    from test_score_categorize import tiny_model

    from core.maths.score import ScoreSettings, make_distance, minority_scores

    model = tiny_model(size=16)
    imgs = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    st = ScoreSettings("unet-feat", 500, 2, 0)
    fp32 = minority_scores(model, imgs, torch.arange(4), st, make_distance("unet-feat", model=model))
    model.precision = "bf16"
    mixed = minority_scores(model, imgs, torch.arange(4), st, make_distance("unet-feat", model=model))
    assert (fp32 == mixed).all()
    x = torch.randn(2, 1, 16, 16)
    t = torch.full((2,), 300)
    assert not torch.equal(model(x, t), model.predict(x, t, precision="fp32").eps)  # sampling: bf16 here
