"""Issue 16.9-12: cheap guards of the headline claims; each fails if the claim breaks."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from core.bundles.bundle import load_bundle
from core.bundles.data import ImageSet
from core.maths.guidance import ClassifierGuidance, combine
from core.nets.models import ClassifierConfig, UNetConfig
from core.maths.sampling import sample, to_uint8
from core.maths.score import ScoreSettings, make_distance, minority_scores
from core.evaluation.severity import SeverityEstimator
from core.nets.train import ClassifierTrainConfig, DiffusionTrainConfig, train_classifier, train_diffusion

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLE = ASSETS / "mri-atrophy"
# the README's targets for the shipped scores (issue 3: MRI >= 0.5; issue 17: faces, reported 0.75)
SPEARMAN_FLOOR = {"mri-atrophy": 0.5, "faces": 0.7}


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(BUNDLE)


@pytest.fixture(scope="module", params=["mri-atrophy", "faces"])
def any_bundle(request):
    return load_bundle(ASSETS / request.param)


def test_stored_scores_are_what_the_code_computes(any_bundle):
    """Issue 24.4: the bundle's real scores (behind the README's Spearman 0.54 / 0.75 and every class) are
    recomputed *with the code*: 16 real images rescored at their original dataset indices with the manifest's
    distance, t, draws and seed equal the stored float32 scores to 1e-6 and real.csv's 6-digit ones."""
    b = any_bundle
    s = b.manifest["score"]
    settings = ScoreSettings(distance=s["distance"], t=int(s["t"]), draws=int(s["draws"]), seed=int(s["seed"]),
                             clip=bool(s.get("clip", True)))
    rows = np.sort(np.random.default_rng(24).choice(len(b.real.score), 16, replace=False))
    x = torch.from_numpy(b.real.images[rows]).permute(0, 3, 1, 2).contiguous()
    got = minority_scores(b.model, x, torch.from_numpy(rows), settings, make_distance(settings.distance, seed=settings.seed,
                                                                                        model=b.model))
    np.testing.assert_allclose(got, b.real.score[rows], rtol=0, atol=1e-6)
    with open(b.root / "real.csv", newline="") as f:
        table = list(csv.DictReader(f))
    np.testing.assert_allclose(got, [float(table[i]["score"]) for i in rows], rtol=2e-5)


def test_the_spearman_claim_is_the_stored_scores_against_the_truth(any_bundle):
    """Spearman(score, truth) over every real row, from the arrays the previous test ties to the code, is the
    manifest's recorded value and clears the README's target."""
    b = any_bundle
    rho = spearmanr(b.real.score, b.real.truth).statistic
    recorded = b.manifest["score"].get("spearman_vs_truth", b.manifest["score"].get("spearman_vs_severity"))
    assert rho == pytest.approx(recorded, abs=2e-3)
    assert rho >= SPEARMAN_FLOOR[b.manifest["name"]], rho


def test_classes_are_the_quantile_bins_of_the_stored_scores(any_bundle):
    """The manifest's L thresholds and every real image's class, recomputed from the scores by the code's
    quantile binning (fit_labels), equal the stored ones: a binning shifted by one class fails here."""
    from core.maths.categorize import fit_labels

    b = any_bundle
    thresholds, labels = fit_labels(b.real.score.astype(np.float64), b.num_classes)
    np.testing.assert_allclose(thresholds, b.manifest["thresholds"], rtol=1e-6)
    assert np.array_equal(labels, b.real.label)
    assert np.bincount(labels, minlength=b.num_classes).min() >= len(labels) // b.num_classes - 1  # quantile bins


def test_the_classifier_reads_the_timestep(bundle):
    """The noise-conditioned classifier's answer depends on t: the same x_t read at t = 100 and t = 900 gives
    class distributions apart (total variation > 0.1; 0.22 measured, exactly 0 for a classifier blind to t), and at the right t its expected class tracks the
    true class of lightly noised real slices (Spearman > 0.5; the manifest records 0.50 held out over all t)."""
    rows = np.random.default_rng(7).choice(len(bundle.real.score), 64, replace=False)
    x0 = torch.from_numpy(bundle.real.images[rows]).permute(0, 3, 1, 2).float() / 127.5 - 1
    g = torch.Generator().manual_seed(0)
    t = torch.full((64,), 100, dtype=torch.long)
    x_t = bundle.model.schedule.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    net = bundle.classifier.net
    with torch.no_grad():
        p_right = torch.softmax(net(x_t, t), -1)
        p_wrong = torch.softmax(net(x_t, torch.full_like(t, 900)), -1)
    tv = 0.5 * (p_right - p_wrong).abs().sum(-1).mean().item()
    assert tv > 0.1, tv
    expected = (p_right * torch.arange(p_right.shape[1])).sum(-1).numpy()
    assert spearmanr(expected, bundle.real.label[rows]).statistic > 0.5


# Issue 24.4: the MRI effect, measured with the code at a fraction of the documented cost. RESULTS (256 samples,
# 50 DDIM steps): at l = L-1, w = 2.5, 96.9 % of samples lie above the real 90th severity percentile (standard
# 5.9 %) and the mean estimated severity rises by 0.83. Here 24 samples, 10 DDIM steps, same seeds for both
# rows; the guard asks for 80 % of the claimed share and 60 % of the claimed gain. Measured at this setting:
# share 0.958 (w = 2.5), 0.375 at w = 0.5 (the scale x 0.2), standard 0.083; gain 1.28 (0.21 at w = 0.5).
CLAIM_SHARE, CLAIM_GAIN = 0.969, 0.83


def test_guidance_at_the_rarest_class_reaches_most_of_the_claimed_effect(bundle):
    L = bundle.num_classes
    est = SeverityEstimator().fit(bundle.real.images, bundle.real.truth)
    p90 = np.percentile(est(bundle.real.images), 90)
    runs = {}
    for name, guidance in (("standard", None), ("guided", combine(ClassifierGuidance(bundle.classifier.net, L - 1, 2.5)))):
        x = sample(bundle.model, 24, steps=10, sampler="ddim", guidance=guidance, generator=torch.Generator().manual_seed(5))
        runs[name] = est(to_uint8(x))
    share = {k: float((v > p90).mean()) for k, v in runs.items()}
    gain = float(runs["guided"].mean() - runs["standard"].mean())
    assert share["standard"] <= 0.25, share  # the standard sampler stays near the real 10 %
    assert share["guided"] >= 0.8 * CLAIM_SHARE, share
    assert gain >= 0.6 * CLAIM_GAIN, gain


def test_severity_estimator_is_accurate_on_held_out_phantom_slices(tmp_path):
    """core.evaluation.severity reads every rare-share figure: its held-out Spearman with the true atrophy."""
    from core.bundles.data import load_image_folder
    from core.demos.phantom import build_mri_phantom

    folder = build_mri_phantom(tmp_path / "p", n=400, size=32, seed=11)
    data = load_image_folder(folder, 32, 1)
    with open(folder / "metadata.csv", newline="") as f:
        sev = {r["path"]: float(r["severity"]) for r in csv.DictReader(f)}
    y = np.array([sev[p] for p in data.paths])
    imgs = data.images.permute(0, 2, 3, 1).numpy()
    est = SeverityEstimator().fit(imgs[:200], y[:200])
    rho = spearmanr(est(imgs[200:]), y[200:]).statistic
    assert rho > 0.7, rho


def test_phantom_severity_is_the_stated_long_tailed_mixture():
    """README: 90 % Beta(1.2, 10), 10 % U(0.25, 1)."""
    from scipy.stats import beta

    from core.demos.phantom import draw_severity

    s = draw_severity(np.random.default_rng(0), 40000)
    expected_above = 0.9 * (1 - beta.cdf(0.25, 1.2, 10)) + 0.1  # P(severity > 0.25)
    assert abs((s > 0.25).mean() - expected_above) < 0.01
    assert abs(((s > 0.6).mean()) - (0.9 * (1 - beta.cdf(0.6, 1.2, 10)) + 0.1 * 0.4 / 0.75)) < 0.006
    assert abs(np.median(s) - beta.median(1.2, 10) * 1.0) < 0.02  # the bulk is the Beta component


def _tiny(n=32, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    bright = torch.arange(n) % 2
    base = torch.where(bright[:, None, None, None].bool(), 200, 40).expand(n, 1, size, size)
    noise = torch.randint(-20, 21, (n, 1, size, size), generator=g)
    images = (base + noise).clamp(0, 255).to(torch.uint8)
    return ImageSet(root="tiny", paths=[f"{i}.png" for i in range(n)], images=images), bright


def test_diffusion_training_lowers_the_loss(tmp_path):
    """A trainer that never updates the weights keeps its initial loss; this one must fall within 60 steps."""
    data, _ = _tiny()
    losses = []
    cfg = DiffusionTrainConfig(steps=60, batch_size=8, lr=1e-3, save_every=60, seed=0,
                               unet=UNetConfig(16, 1, (8, 16), attention=False))
    train_diffusion(data, tmp_path / "run", cfg, progress=lambda s, n, m: losses.append(m["loss"]))
    assert len(losses) == 60
    assert np.mean(losses[-15:]) < 0.7 * np.mean(losses[:5]), (losses[:5], losses[-15:])


def test_classifier_training_lowers_the_held_out_cross_entropy(tmp_path):
    data, bright = _tiny(n=40)
    from core.maths.schedule import make_schedule

    cfg = ClassifierTrainConfig(steps=150, batch_size=16, lr=2e-3, holdout=0.25, eval_every=75, seed=0,
                                net=ClassifierConfig(image_size=16, channels=1, num_outputs=2, base_channels=8,
                                                     channel_mult=(1, 2)))
    train_classifier(data, bright.numpy(), make_schedule("linear", 1000), tmp_path / "clf", cfg, [0.0, 1.0], {})
    log = [json.loads(line) for line in (tmp_path / "clf" / "log.jsonl").read_text().splitlines()]
    # an untrained 2-way classifier sits at the chance cross-entropy ln 2 = 0.693 (its initial logits are small)
    assert [r["step"] for r in log] == [75, 150]
    assert log[-1]["val_loss"] < np.log(2) - 0.15 and log[-1]["val_loss"] <= log[0]["val_loss"] + 0.02, log
