"""Minority score (Eq. 7, Corollary 1), its distances, and quantile categorisation."""
import numpy as np
import pytest
import torch

from analytic import AnalyticMixture
from core.maths.categorize import categorize, categorize_per_class, fit_labels, quantile_thresholds
from core.errors import DataError, OfflineError
from core.nets.models import DiffusionModel, UNetConfig, build_unet
from core.maths.schedule import make_schedule
from core.maths.score import (ScoreSettings, make_distance, minority_score_batch, minority_scores, sample_noise,
                        ssim_distance)


def tiny_model(seed=0, channels=1, size=8, schedule="linear"):
    torch.manual_seed(seed)
    cfg = UNetConfig(image_size=size, channels=channels, block_out_channels=(8, 16), attention=False)
    return DiffusionModel(build_unet(cfg), make_schedule(schedule), size, channels).eval().requires_grad_(False)


@pytest.mark.parametrize("t", [100, 600])
def test_corollary_1_l2_score_is_scaled_noise_error(t):
    """l(x0) with squared error = (1 - abar_t)/abar_t * E||eps_theta(x_t, t) - eps||^2 (per pixel), exactly."""
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1
    idx = torch.arange(6)
    settings = ScoreSettings(distance="l2", t=t, draws=3, seed=7, clip=False)
    score = minority_score_batch(model, x0, idx, settings, make_distance("l2"))
    eps = sample_noise(idx, 3, (1, 8, 8), seed=7)
    tt = torch.full((6,), t)
    abar = float(model.schedule.abar[t])
    err = torch.stack([(model(model.schedule.q_sample(x0, tt, e), tt) - e).pow(2).flatten(1).mean(1) for e in eps]).mean(0)
    torch.testing.assert_close(score, (1 - abar) / abar * err, rtol=1e-5, atol=1e-7)


def test_score_is_independent_of_batching_and_order():
    model = tiny_model()
    images = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    idx = torch.arange(10)
    s = ScoreSettings(distance="l1", t=600, draws=2, seed=3)
    a = minority_scores(model, images, idx, s, make_distance("l1"), batch_size=10)
    b = minority_scores(model, images, idx, s, make_distance("l1"), batch_size=3)
    perm = torch.tensor([9, 2, 5, 0, 1, 8, 3, 7, 6, 4])
    c = minority_scores(model, images[perm], idx[perm], s, make_distance("l1"), batch_size=4)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a[perm.numpy()], c, rtol=1e-6)
    other = minority_scores(model, images, idx, ScoreSettings("l1", 600, 2, seed=4), make_distance("l1"))
    assert not np.allclose(a, other), "another seed must give other noise draws"


def test_rare_points_score_higher_with_the_optimal_model():
    """With the exact eps-model of a 95/5 mixture, the rare component's points get higher scores."""
    mix = AnalyticMixture([[-0.5, 0.0], [0.5, 0.0]], [0.95, 0.05], std=0.1)
    g = torch.Generator().manual_seed(0)
    common = torch.tensor([-0.5, 0.0]) + 0.1 * torch.randn(200, 2, generator=g)
    rare = torch.tensor([0.5, 0.0]) + 0.1 * torch.randn(200, 2, generator=g)
    x0 = torch.cat([common, rare]).reshape(400, 2, 1, 1)
    s = minority_score_batch(mix, x0, torch.arange(400), ScoreSettings("l2", 600, 5, 0), make_distance("l2"))
    assert float(s[200:].mean()) > 3 * float(s[:200].mean())


def test_distances_zero_on_identical_and_positive_otherwise():
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    for name in ("l2", "l1", "ssim", "lpips-rand"):
        d = make_distance(name, seed=0)
        same, diff = d(x, x), d(x, y)
        assert same.shape == (3,) and torch.all(same.abs() < 1e-5), name
        assert torch.all(diff > 1e-5) and torch.all(diff > 100 * same.abs().max()), name
    assert ssim_distance(x[:, :1], x[:, :1]).abs().max() < 1e-5  # grey input


def test_lpips_rand_is_a_function_of_the_seed():
    x, y = torch.rand(2, 1, 16, 16) * 2 - 1, torch.rand(2, 1, 16, 16) * 2 - 1
    a, b, c = make_distance("lpips-rand", seed=0), make_distance("lpips-rand", seed=0), make_distance("lpips-rand", seed=1)
    assert torch.equal(a(x, y), b(x, y)) and not torch.equal(a(x, y), c(x, y))


def test_lpips_rand_is_a_distance_with_uniform_channel_weights():
    """Issue 15.1: lpips-rand had random, signed learned heads (lpips=True, pretrained=False) and could be
    negative. With uniform channel weights it is >= 0, zero on identical images, symmetric, and grows along a
    ladder of more noise (and more blur) of one image."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 32, 32, generator=g) * 2 - 1, torch.rand(16, 1, 32, 32, generator=g) * 2 - 1
    for seed in (0, 1, 2):
        d = make_distance("lpips-rand", seed=seed)
        assert torch.all(d(x, y) > 0), seed
        assert torch.all(d(x, x).abs() < 1e-6), seed
        torch.testing.assert_close(d(x, y), d(y, x), rtol=1e-5, atol=1e-7)
    d = make_distance("lpips-rand", seed=0)
    img = torch.linspace(-1, 1, 32).view(1, 1, 1, 32) * torch.linspace(1, -1, 32).view(1, 1, 32, 1)  # smooth pattern
    img = (img + 0.3 * torch.sin(torch.arange(32.0) / 2).view(1, 1, 1, 32)).clamp(-1, 1)
    noise = torch.randn(img.shape, generator=g)
    by_noise = [float(d(img, (img + s * noise).clamp(-1, 1))) for s in (0.05, 0.1, 0.2, 0.4, 0.8)]
    assert all(a < b for a, b in zip(by_noise, by_noise[1:])), by_noise
    blur = [img]
    for _ in range(4):  # box blur applied again and again
        blur.append(torch.nn.functional.avg_pool2d(torch.nn.functional.pad(blur[-1], (1, 1, 1, 1), mode="replicate"), 3, 1))
    by_blur = [float(d(img, b)) for b in blur[1:]]
    assert all(a < b for a, b in zip(by_blur, by_blur[1:])), by_blur


def test_lpips_without_weights_fails_at_once_naming_the_fallbacks(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(OfflineError, match="lpips-rand, ssim or l2"):
        make_distance("lpips")
    with pytest.raises(OfflineError, match="alexnet-owt-7be5be79.pth.*lpips-rand, ssim or l2"):
        make_distance("lpips-alex")  # the official self-guided sampler's trunk
    with pytest.raises(ValueError, match="allowed: lpips, lpips-alex, lpips-rand, unet-feat, ssim, l2, l1"):
        make_distance("cosine")


def test_unet_feat_is_the_models_own_down_block_activations():
    """unet-feat = mean over the first 2 down blocks of sum_c (f/|f|_c - g/|g|_c)^2 averaged over positions, where
    f, g are what the full UNet computes in those blocks for x0 and x0_hat at t_f = T/5 (read here by hooks)."""
    model = tiny_model(size=16)
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    grabbed = []
    hooks = [b.register_forward_hook(lambda m, i, o: grabbed.append(o[0])) for b in model.net.down_blocks[:2]]
    tf = torch.full((3,), model.schedule.T // 5)
    feats = []
    for z in (x, y):
        grabbed.clear()
        model(z, tf)
        feats.append([f / f.pow(2).sum(1, keepdim=True).sqrt() for f in grabbed])
    for h in hooks:
        h.remove()
    expected = torch.stack([(a - b).pow(2).sum(1).mean((1, 2)) for a, b in zip(*feats)]).mean(0)
    d = make_distance("unet-feat", model=model)
    torch.testing.assert_close(d(x, y), expected, rtol=1e-5, atol=1e-7)
    assert d(x, y).shape == (3,) and torch.all(d(x, y) > 1e-4) and torch.all(d(y, y).abs() < 1e-6)


def test_unet_feat_scores_do_not_depend_on_batching():
    """unet-feat caches x0's features over the draws of one batch: the cache must not leak across batches."""
    model = tiny_model()
    images = torch.randint(0, 256, (7, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    s = ScoreSettings(distance="unet-feat", t=600, draws=3, seed=0)
    a = minority_scores(model, images, torch.arange(7), s, make_distance("unet-feat", model=model), batch_size=7)
    b = minority_scores(model, images, torch.arange(7), s, make_distance("unet-feat", model=model), batch_size=2)
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_unet_feat_cache_follows_in_place_changes_and_grad_mode():
    """x0's features are reused over draws only while x0 is the same, unchanged tensor and no graph is built."""
    model = tiny_model(size=16)
    d = make_distance("unet-feat", model=model)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert torch.all(d(x, y) > 1e-4)
        x.copy_(y)  # the same object, new contents
        assert torch.all(d(x, y).abs() < 1e-6)
    xg = y.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(d(xg, x.flip(-1)).sum(), xg)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_unet_feat_needs_a_unet_backbone():
    with pytest.raises(ValueError, match="needs the diffusion model"):
        make_distance("unet-feat")
    mix = AnalyticMixture([[-0.5, 0.0], [0.5, 0.0]], [0.5, 0.5], std=0.1)
    with pytest.raises(ValueError, match="UNet2DModel backbone"):
        make_distance("unet-feat", model=mix)


def test_quantile_binning_matches_the_official_rule():
    scores = np.arange(1, 101, dtype=float)  # 1..100
    th = quantile_thresholds(scores, 10)
    labels = categorize(scores, th)
    assert th[-1] == 100 and np.all(np.diff(th) > 0)
    assert np.bincount(labels).tolist() == [10] * 10
    # q[j-1] < s <= q[j] -> class j: cross-check against torch.bucketize(right=False)
    ref = torch.bucketize(torch.tensor(scores), torch.tensor(th[:-1]), right=False).numpy()
    np.testing.assert_array_equal(labels, ref)
    # new data labelled with stored thresholds: below min -> 0, above max -> L-1
    assert categorize(np.array([-5.0, 1e9]), th).tolist() == [0, 9]
    assert labels[0] == 0 and labels[-1] == 9, "class 0 is most common (lowest score), L-1 rarest"


def test_per_class_thresholds_and_errors():
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0, 1, 60), rng.normal(10, 1, 40)])
    cls = np.array([0] * 60 + [1] * 40)
    th, labels = fit_labels(scores, 4, cls)
    assert set(th) == {0, 1}
    for c in (0, 1):  # equal-count bins inside each class, despite the shifted scales
        counts = np.bincount(labels[cls == c], minlength=4)
        assert counts.max() - counts.min() <= 1
    np.testing.assert_array_equal(categorize_per_class(scores, cls, th), labels)
    with pytest.raises(DataError, match="at least 50"):
        quantile_thresholds(np.arange(10.0), 50)
    with pytest.raises(DataError, match="NaN"):
        quantile_thresholds(np.array([1.0, np.nan, 2.0]), 2)
    with pytest.raises(ValueError, match=">= 2"):
        quantile_thresholds(np.arange(10.0), 1)
