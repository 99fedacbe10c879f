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

BUNDLE = Path(__file__).resolve().parent.parent / "assets" / "mri-atrophy"


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(BUNDLE)


def test_shipped_spearman_is_what_real_csv_says():
    """The manifest's Spearman(score, severity) (README: 0.54) recomputed from the bundle's real.csv."""
    manifest = json.loads((BUNDLE / "manifest.json").read_text())
    with open(BUNDLE / "real.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rho = spearmanr([float(r["score"]) for r in rows], [float(r["severity"]) for r in rows]).statistic
    assert len(rows) == 6000
    assert rho == pytest.approx(manifest["score"]["spearman_vs_severity"], abs=2e-3)
    assert rho >= 0.5  # the issue-3 target the README reports as met


def test_guidance_at_the_rarest_class_raises_score_and_severity(bundle):
    """Same seed, l = L-1: guided images have a higher mean minority score (the captions' measure) and a higher
    estimated atrophy than the standard sampler's."""
    L = bundle.num_classes
    runs = {}
    for name, guidance in (("standard", None), ("guided", combine(ClassifierGuidance(bundle.classifier.net, L - 1, 2.5)))):
        x = sample(bundle.model, 12, steps=12, sampler="ddim", guidance=guidance, generator=torch.Generator().manual_seed(5))
        runs[name] = to_uint8(x)
    m = bundle.manifest["score"]
    settings = ScoreSettings(distance=m["distance"], t=int(m["t"]), draws=2, seed=int(m["seed"]))
    distance = make_distance(settings.distance, seed=settings.seed, model=bundle.model)
    est = SeverityEstimator().fit(bundle.real.images, bundle.real.truth)
    score = {k: minority_scores(bundle.model, torch.from_numpy(v).permute(0, 3, 1, 2).contiguous(), torch.arange(len(v)),
                                settings, distance).mean() for k, v in runs.items()}
    severity = {k: est(v).mean() for k, v in runs.items()}
    assert score["guided"] > score["standard"], score
    assert severity["guided"] > severity["standard"] + 0.1, severity


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
