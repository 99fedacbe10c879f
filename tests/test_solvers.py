"""Issue 26.1: minority guidance in diffusers' schedulers through one guided-eps wrapper (core/maths/solvers.py)."""
from pathlib import Path

import pytest
import torch

from analytic import AnalyticMixture, PosteriorClassifier
from core.maths.eps_model import ModelOutput
from core.maths.guidance import ClassifierGuidance, SelfGuidance, combine
from core.maths.sampling import REFERENCE_SAMPLERS, SAMPLERS, BoostSkip, sample, sample_ddim
from core.maths.schedule import make_schedule
from core.maths.score import make_distance
from core.maths.solvers import LEARNED_VARIANCE_SOLVERS, SOLVERS, sample_scheduler, solver_timesteps
from core.nets.models import DiffusionModel, UNetConfig, build_unet

MRI = Path(__file__).resolve().parent.parent / "assets" / "mri-atrophy"
LISTED = ("dpmpp-2m", "dpmpp-2m-sde", "unipc", "euler-a", "diffusers-ddim", "diffusers-ddpm")  # the issue's list


def mixture(schedule="linear"):
    """Two components on R^3: 90 % around x[0] = -0.5 (common), 10 % around x[0] = +0.5 (rare)."""
    return AnalyticMixture([[-0.5, 0.1, 0.0], [0.5, 0.2, 0.0]], [0.9, 0.1], std=0.1, schedule=make_schedule(schedule))


def noise(n, shape=(3, 1, 1), seed=0, dtype=torch.float32):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_the_issue_lists_solvers_are_all_offered():
    assert set(LISTED) <= set(SOLVERS) and set(SAMPLERS) == set(REFERENCE_SAMPLERS) | set(SOLVERS)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_diffusers_ddim_equals_our_ddim_where_the_maths_coincide(schedule):
    """eta 0, the same timesteps (diffusers' trailing grid, fed to ours), float64: unguided with the clip (diffusers
    re-derives eps from the clipped x0, use_clipped_model_output, as ADM does) and guided without it (with the clip,
    ADM adds the guidance after clipping x0 and diffusers clips after the guided eps: the maths part there)."""
    mix = mixture(schedule)
    x_T = noise(64, dtype=torch.float64)
    ts = solver_timesteps("diffusers-ddim", mix.schedule, 20)
    assert ts[-1] == 999 and len(ts) == 20
    guided = ClassifierGuidance(PosteriorClassifier(mix), 1, 2.0)
    for guidance, clip in ((None, True), (guided, False)):
        ours = sample_ddim(mix, x_T, ts, guidance=guidance, clip_denoised=clip)
        theirs = sample_scheduler(mix, x_T, ts, guidance=guidance, clip_denoised=clip, name="diffusers-ddim")
        assert (ours - theirs).abs().max().item() <= 1e-10  # measured: 5e-14
    # with the clip and guidance the two orders differ by a visible amount (the test can tell them apart)
    ours = sample_ddim(mix, x_T, ts, guidance=guided, clip_denoised=True)
    theirs = sample_scheduler(mix, x_T, ts, guidance=guided, clip_denoised=True, name="diffusers-ddim")
    assert (ours - theirs).abs().max().item() > 1e-3


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_diffusers_ddim_equals_our_ddim_on_a_unet_in_float32(schedule):
    """The same on a (random) UNet2DModel in float32, clipped, unguided and guided by a toy classifier: 1e-5."""
    torch.manual_seed(0)
    cfg = UNetConfig(image_size=16, channels=1, block_out_channels=(8, 16), attention=False)
    model = DiffusionModel(build_unet(cfg), make_schedule(schedule), 16, 1).eval().requires_grad_(False)
    x_T = noise(4, (1, 16, 16))
    ts = solver_timesteps("diffusers-ddim", model.schedule, 10)
    ours = sample_ddim(model, x_T, ts)
    theirs = sample_scheduler(model, x_T, ts, name="diffusers-ddim")
    assert (ours - theirs).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", LISTED)
def test_every_solver_samples_the_mixture_and_guidance_finds_the_rare_component(name):
    """Unguided, 20 steps: the rare component's share is near its weight 0.1 and the mean of x[0] near the
    mixture's -0.4 (a missing init_noise_sigma or a wrong schedule moves both); guided toward the rare component
    (the exact posterior p(k | x_t), w = 2): most samples land there."""
    mix = mixture("cosine")
    g = ClassifierGuidance(PosteriorClassifier(mix), 1, 2.0)
    plain = sample(mix, 512, steps=20, sampler=name, generator=torch.Generator().manual_seed(1))
    guided = sample(mix, 512, steps=20, sampler=name, guidance=g, generator=torch.Generator().manual_seed(1))
    share = float((plain[:, 0] > 0).float().mean())
    assert 0.04 <= share <= 0.17, share  # measured 0.074 .. 0.104
    assert abs(float(plain[:, 0].mean()) + 0.4) <= 0.05
    assert float((guided[:, 0] > 0).float().mean()) >= 0.95  # measured 1.000 on every solver


@pytest.mark.parametrize("name", LISTED)
def test_the_model_first_sees_x_T_at_the_noisy_end(name):
    """Whatever space a scheduler integrates in (Euler's sigma space starts at x_T * init_noise_sigma), the
    model's first input is the x_T drawn from N(0, I), at t = T - 1."""
    mix, seen = mixture("cosine"), []

    class Spy(torch.nn.Module):
        schedule, channels, image_size, num_classes, device = mix.schedule, 3, 1, 0, torch.device("cpu")

        def forward(self, x_t, t, class_labels=None):
            seen.append((x_t.clone(), t.clone()))
            return mix(x_t, t)

    x_T = noise(8)
    sample_scheduler(Spy(), x_T, solver_timesteps(name, mix.schedule, 5), name=name)
    assert torch.allclose(seen[0][0], x_T, atol=1e-5) and int(seen[0][1][0]) == 999


def test_scale_zero_is_the_unguided_solver():
    mix = mixture()
    zero = combine(ClassifierGuidance(PosteriorClassifier(mix), 1, 0.0))
    a = sample(mix, 16, steps=10, sampler="dpmpp-2m", guidance=zero, generator=torch.Generator().manual_seed(3))
    b = sample(mix, 16, steps=10, sampler="dpmpp-2m", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_self_guidance_and_boost_skip_are_refused_by_the_solvers():
    mix = mixture()
    sg = SelfGuidance(mix, 1.0, make_distance("l2"))
    with pytest.raises(ValueError, match=r"self-guided minority sampling is defined for the samplers ddpm, ddim, not for unipc"):
        sample(mix, 2, steps=5, sampler="unipc", guidance=sg)
    with pytest.raises(ValueError, match=r"defined for the samplers ddpm, ddim, not for euler-a"):  # inside a sum too
        sample(mix, 2, steps=5, sampler="euler-a", guidance=combine(sg, ClassifierGuidance(PosteriorClassifier(mix), 1, 1.0)))
    with pytest.raises(ValueError, match=r"Boost-and-Skip is defined for the samplers ddim, ddpm, not for dpmpp-2m"):
        sample(mix, 2, steps=5, sampler="dpmpp-2m", init=BoostSkip(2.0, 1))
    sample(mix, 2, steps=5, sampler="ddpm", guidance=sg)  # ours still take it


class LearnedVariance(torch.nn.Module):
    """The mixture's eps with a constant learned_range output v (v = -1: beta~, v = +1: beta)."""

    def __init__(self, mix, v):
        super().__init__()
        self.mix, self.v, self.schedule = mix, v, mix.schedule
        self.variance_type, self.channels, self.image_size, self.num_classes = "learned_range", 3, 1, 0
        self.device = torch.device("cpu")

    def forward(self, x_t, t, class_labels=None):
        return self.mix(x_t, t)

    def predict(self, x_t, t, class_labels=None, precision=None):
        return ModelOutput(self.mix(x_t, t), torch.full_like(x_t, self.v))


def test_a_learned_variance_is_read_by_diffusers_ddpm_and_said_once_elsewhere():
    mix = mixture()
    fixed = sample(mix, 64, steps=10, sampler="diffusers-ddpm", generator=torch.Generator().manual_seed(2))
    low = sample(LearnedVariance(mix, -1.0), 64, steps=10, sampler="diffusers-ddpm", generator=torch.Generator().manual_seed(2))
    high = sample(LearnedVariance(mix, 1.0), 64, steps=10, sampler="diffusers-ddpm", generator=torch.Generator().manual_seed(2))
    assert (low - fixed).abs().max().item() <= 1e-5  # v = -1 is the fixed posterior variance
    assert (high - fixed).abs().max().item() > 1e-2  # v = +1 (beta) is read: a different draw
    assert LEARNED_VARIANCE_SOLVERS == ("diffusers-ddpm",)
    notes = []
    for _ in range(2):
        sample(LearnedVariance(mix, 1.0), 4, steps=5, sampler="dpmpp-2m", notes=notes)
    assert len(notes) == 1 and "learned variance (learned_range); dpmpp-2m cannot use it" in notes[0]
    none = []
    sample(LearnedVariance(mix, 1.0), 4, steps=5, sampler="diffusers-ddpm", notes=none)
    assert none == []


def test_guidance_toward_the_rarest_class_raises_the_mri_score_at_10_dpm_solver_steps():
    """Issue 26 proof: on the shipped MRI bundle, 10 DPM-Solver++ 2M steps guided toward l = L - 1 (w = 2.5)
    give a higher mean minority score than w = 0 from the same seed (the bundle's distance and t, 4 draws)."""
    from core.bundles.bundle import load_bundle
    from core.maths.score import ScoreSettings, minority_scores

    b = load_bundle(MRI)
    s = b.manifest["score"]
    settings = ScoreSettings(distance=s["distance"], t=int(s["t"]), draws=4, seed=0)
    distance = make_distance(settings.distance, seed=0, model=b.model)
    mean = {}
    for w in (0.0, 2.5):
        guidance = combine(ClassifierGuidance(b.classifier.net, b.num_classes - 1, w))
        x = sample(b.model, 24, steps=10, sampler="dpmpp-2m", guidance=guidance, generator=torch.Generator().manual_seed(5))
        u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        mean[w] = float(minority_scores(b.model, u8, torch.arange(24), settings, distance).mean())
    assert mean[2.5] >= MRI_MARGIN * mean[0.0], mean


# measured (seed 5, 24 samples, 4 draws): w = 0: 0.062 (the real slices' mean is 0.059), w = 0.5: 0.102 (1.6x),
# w = 1: 0.164 (2.6x), w = 2.5: 0.265 (4.3x); the guard asks for 2.5x, which a guidance cut to a fifth fails
MRI_MARGIN = 2.5
