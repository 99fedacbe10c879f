"""Closed-form checks of the schedule, Tweedie's formula, the samplers and guidance."""
import pytest
import torch

from analytic import AnalyticMixture, PosteriorClassifier
from core.maths.guidance import ClassifierGuidance, GuidanceSum, MixtureGuidance, combine
from core.maths.sampling import sample
from core.maths.schedule import make_schedule


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_schedule_tables(name):
    s = make_schedule(name, 1000)
    assert s.abar.shape == (1000,)
    assert torch.all(s.abar[1:] < s.abar[:-1]), "abar must decrease"
    assert 0.99 < float(s.abar[0]) < 1.0 and float(s.abar[-1]) < 1e-3
    if name == "linear":
        assert float(s.betas[0]) == pytest.approx(1e-4) and float(s.betas[-1]) == pytest.approx(0.02)
    assert s.default_score_t() == (900 if name == "cosine" else 600)


def test_respacing_and_errors():
    s = make_schedule("linear", 1000)
    ts = s.timesteps(10)
    assert ts.tolist()[0] == 0 and ts.tolist()[-1] == 999 and len(set(ts.tolist())) == 10
    assert len(s.timesteps(1000)) == 1000
    for bad in (0, -3, 1001):
        with pytest.raises(ValueError, match="steps must be in"):
            s.timesteps(bad)
    with pytest.raises(ValueError, match="allowed: linear, cosine"):
        make_schedule("sigmoid")


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("t", [50, 400, 900])
def test_tweedie_is_exact_posterior_mean(name, t):
    """Eq. 6 with the optimal eps-model equals E[x0 | x_t] computed from the Gaussian posterior."""
    model = AnalyticMixture([[0.3, -0.2, 0.1]], [1.0], std=0.25, schedule=make_schedule(name))
    g = torch.Generator().manual_seed(0)
    x0 = 0.3 + 0.25 * torch.randn(64, 3, 1, 1, generator=g, dtype=torch.float64)
    tt = torch.full((64,), t)
    x_t = model.schedule.q_sample(x0, tt, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    x0_hat = model.schedule.tweedie_x0(x_t, tt, model(x_t, tt), clip=False)
    torch.testing.assert_close(x0_hat, model.posterior_mean(x_t, tt), rtol=1e-9, atol=1e-9)
    # a two-component mixture too: Tweedie is the posterior mean whatever the data law
    mix = AnalyticMixture([[-0.5, 0.0, 0.0], [0.5, 0.2, 0.0]], [0.8, 0.2], std=0.1, schedule=make_schedule(name))
    x0_hat = mix.schedule.tweedie_x0(x_t, tt, mix(x_t, tt), clip=False)
    torch.testing.assert_close(x0_hat, mix.posterior_mean(x_t, tt), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_samplers_reproduce_gaussian_moments(sampler, eta):
    """With the exact eps-model and the full schedule, samples have the data's mean and std.

    (Respaced runs shrink the variance of this narrow Gaussian, as DDIM and the fixed-small DDPM
    variance are known to; that is discretisation, not a bug, so the moments test uses T steps.)
    """
    mu, s = torch.tensor([0.3, -0.2]), 0.2
    model = AnalyticMixture([mu.tolist()], [1.0], std=s)
    x = sample(model, 4000, steps=1000, sampler=sampler, eta=eta, generator=torch.Generator().manual_seed(1))
    x = x.reshape(4000, 2).double()
    torch.testing.assert_close(x.mean(0), mu.double(), atol=0.015, rtol=0)
    torch.testing.assert_close(x.std(0), torch.full((2,), s, dtype=torch.float64), atol=0.015, rtol=0)


def test_ddim_eta_one_is_ancestral_ddpm():
    """On the full schedule, DDIM's sigma at eta=1 is the DDPM posterior std: same noise, same samples."""
    model = AnalyticMixture([[0.1, 0.4]], [1.0], std=0.3)
    a = sample(model, 256, steps=1000, sampler="ddpm", generator=torch.Generator().manual_seed(2))
    b = sample(model, 256, steps=1000, sampler="ddim", eta=1.0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def _three_way():
    # classes on a line: 0 = common (70 %), 1 = less common (22 %), 2 = rare (8 %)
    mix = AnalyticMixture([[-0.6, 0.0], [0.0, 0.0], [0.6, 0.0]], [0.70, 0.22, 0.08], std=0.12)
    return mix, PosteriorClassifier(mix)


def _component_share(x, mix):
    d = ((x.reshape(len(x), 1, 2).double() - mix.means[None]) ** 2).sum(-1)
    comp = d.argmin(1)
    return torch.stack([(comp == k).double().mean() for k in range(3)]), comp.double().mean()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_guidance_toward_rare_component_is_monotone(sampler):
    mix, clf = _three_way()

    def run(target, scale):
        guidance = combine(ClassifierGuidance(clf, target, scale))
        return sample(mix, 2000, steps=50, sampler=sampler, guidance=guidance, generator=torch.Generator().manual_seed(3))

    base_share, base_mean = _component_share(run(0, 0.0), mix)
    assert abs(float(base_share[2]) - 0.08) < 0.03, "the unguided sampler must respect the weights"
    shares, means = zip(*[_component_share(run(l, 2.0), mix) for l in range(3)])
    rare = [float(s[2]) for s in shares]
    assert rare[2] > 2 * float(base_share[2]), f"guidance to the rare class must raise its share: {rare} vs {base_share}"
    assert rare[0] <= rare[1] <= rare[2] and rare[0] < rare[2]
    assert float(means[0]) < float(means[1]) < float(means[2]), "mean rarity must grow with the target class"
    # the scale w is a second knob: a weak scale moves less than a strong one
    weak, _ = _component_share(run(2, 0.3), mix)
    assert float(base_share[2]) < float(weak[2]) < rare[2]


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_scale_zero_is_the_unguided_sampler_exactly(sampler):
    mix, clf = _three_way()
    assert combine(ClassifierGuidance(clf, 2, 0.0)) is None
    kw = dict(steps=20, sampler=sampler, eta=0.5 if sampler == "ddim" else 0.0)
    plain = sample(mix, 64, generator=torch.Generator().manual_seed(5), **kw)
    # force the zero-scale term through the loop: the result must still be bit-identical
    forced = GuidanceSum((ClassifierGuidance(clf, 2, 0.0),))
    zero = sample(mix, 64, guidance=forced, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(plain, zero)


def test_mixture_guidance_and_sum_raise_rare_share():
    mix, clf = _three_way()
    base, _ = _component_share(sample(mix, 2000, steps=40, generator=torch.Generator().manual_seed(4)), mix)
    tau = [1.0, 5.0, 40.0]  # ascending thresholds as after categorisation
    mixed, _ = _component_share(sample(mix, 2000, steps=40, guidance=combine(MixtureGuidance(clf, tau, 3.0)),
                                       generator=torch.Generator().manual_seed(4)), mix)
    assert float(mixed[2]) > 1.5 * float(base[2])
    # D.9: a second classifier term composes additively; pulling to class 0 as well lowers the rare share
    both = combine(ClassifierGuidance(clf, 2, 2.0), ClassifierGuidance(clf, 0, 2.0))
    summed, _ = _component_share(sample(mix, 2000, steps=40, guidance=both, generator=torch.Generator().manual_seed(4)), mix)
    only, _ = _component_share(sample(mix, 2000, steps=40, guidance=combine(ClassifierGuidance(clf, 2, 2.0)),
                                      generator=torch.Generator().manual_seed(4)), mix)
    assert float(summed[2]) < float(only[2])


def test_negative_scale_is_rejected():
    mix, clf = _three_way()
    with pytest.raises(ValueError, match="scale must be >= 0"):
        combine(ClassifierGuidance(clf, 1, -1.0))


def test_learned_range_interpolation_is_not_clamped():
    """ADM's learned range takes frac = (v + 1) / 2 as it comes (no clamp to [0, 1]): v = 1.5 extrapolates to
    log sigma^2 = 1.25 log beta - 0.25 log beta~ (clipped), written here from the respaced tables directly."""
    import math

    from core.maths.sampling import ddpm_variance
    from core.maths.schedule import respace

    sch = make_schedule("linear", 1000)
    rs = respace(sch, sch.timesteps(10))
    for k, v in ((4, 1.5), (7, -1.8)):
        frac = (v + 1) / 2
        want = math.exp(frac * math.log(float(rs.betas[k])) + (1 - frac) * float(rs.posterior_log_variance_clipped[k]))
        got = ddpm_variance("learned_range", rs, k, torch.full((1, 1, 2, 2), v))
        assert float(got.mean()) == pytest.approx(want, rel=1e-5)
        assert not (min(float(rs.betas[k]), float(rs.posterior_variance[k])) <= want
                    <= max(float(rs.betas[k]), float(rs.posterior_variance[k])))  # outside the clamped range
