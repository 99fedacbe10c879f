"""Issue 25 §1: the paper's method by default. `sample` guides toward the rarest class L-1 and says so in its
first line; `--minority-class all` draws l ~ U{0..L-1}; every method defaults to its paper's ancestral sampler
at 250 steps (50 for DDIM) unless a bundle's manifest records its own; `build` scores a cosine-schedule model
at 0.9T and sweeps a grid that holds 0.9T; `--precision` is recorded and changes only what it should."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from core.cli import main
from test_cli import TINY, make_images

L = 4  # the tiny classifier's classes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A linear-schedule run with an L = 4 classifier (as test_cli's pipeline), and a cosine-schedule run
    with T = 200 (so the 250-step default is capped at T)."""
    base = tmp_path_factory.mktemp("defaults")
    data, run, cos = base / "data", base / "run", base / "cosine"
    make_images(data, 32)
    assert main(["train-diffusion", "--data", str(data), "--out", str(run), "--steps", "30", *TINY]) == 0
    assert main(["score", "--model", str(run), "--data", str(data), "--out", str(run / "scores.csv"),
                 "--distance", "l2", "--draws", "2", "--seed", "0"]) == 0
    assert main(["train-classifier", "--model", str(run), "--data", str(data), "--scores", str(run / "scores.csv"),
                 "--classes", str(L), "--steps", "20", "--batch-size", "16", "--base-channels", "8",
                 "--channel-mult", "1,2", "--eval-every", "10", "--out", str(run / "classifier")]) == 0
    assert main(["train-diffusion", "--data", str(data), "--out", str(cos), "--steps", "5", "--schedule", "cosine",
                 "--T", "200", *TINY]) == 0
    return base, data, run, cos


def _sample(capsys, out, *args, run=None, classifier=True):
    """``sample`` with only the given flags (no --sampler/--steps unless given); (settings, images, first line)."""
    flags = ["--model", str(run), *(["--classifier", str(run / "classifier")] if classifier else [])] if run else []
    capsys.readouterr()
    assert main(["sample", *flags, *map(str, args), "--out", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    z = np.load(out)
    return json.loads(str(z["settings_json"])), z["images"], err[0]


def test_the_default_target_is_the_rarest_class_and_the_first_line_says_so(tiny, tmp_path, capsys):
    _, _, run, _ = tiny
    s, img, first = _sample(capsys, tmp_path / "d.npz", "--n", 3, "--scale", 3, "--steps", 6, run=run)
    assert first.startswith(f"minority guidance toward l = {L - 1} of 0..{L - 1} (the rarest class; default)"), first
    assert s["minority_class"] == L - 1 and s["minority_classes"] == [L - 1] * 3
    _, rare, line = _sample(capsys, tmp_path / "r.npz", "--n", 3, "--scale", 3, "--steps", 6, "--minority-class", L - 1,
                            run=run)
    assert np.array_equal(img, rare) and f"l = {L - 1} of 0..{L - 1} (the rarest class)" in line
    _, common, line = _sample(capsys, tmp_path / "c.npz", "--n", 3, "--scale", 3, "--steps", 6, "--minority-class", 0,
                              run=run)
    assert not np.array_equal(img, common) and "l = 0 of 0..3 (the most common class)" in line


def test_minority_class_all_draws_each_samples_class_uniformly_from_every_class(tiny, tmp_path, capsys):
    from core.maths.guidance import minority_targets

    _, _, run, _ = tiny
    args = ("--n", 40, "--steps", 2, "--sampler", "ddim", "--minority-class", "all")
    s, img, first = _sample(capsys, tmp_path / "a.npz", *args, "--batch-size", 16, run=run)
    assert first.startswith(f"minority guidance toward l ~ U{{0..{L - 1}}} (all classes, seeded)"), first
    assert s["minority_class"] == "all" and sorted(set(s["minority_classes"])) == list(range(L))  # every class reached
    s2, _, _ = _sample(capsys, tmp_path / "b.npz", *args, "--batch-size", 40, run=run)
    assert s2["minority_classes"] == s["minority_classes"]  # seeded, whatever the batching
    _, again, _ = _sample(capsys, tmp_path / "r.npz", *args[:-1], f"0-{L - 1}", "--batch-size", 16, run=run)
    assert np.array_equal(img, again)  # all is the range 0-(L-1)
    s3, _, _ = _sample(capsys, tmp_path / "c.npz", *args, "--seed", 1, run=run)
    assert s3["minority_classes"] != s["minority_classes"]
    # all = the range 0-(L-1): the same draws as the range, seeded the same way
    assert torch.equal(minority_targets("all", 500, 3, 50), minority_targets("0-49", 500, 3, 50))
    draws = minority_targets("all", 20000, 0, 50).numpy()
    freq = np.bincount(draws, minlength=50) / 20000
    assert len(freq) == 50 and freq.min() > 0 and abs(freq - 0.02).max() < 0.005  # 5 binomial sd
    assert torch.equal(minority_targets(None, 3, 0, 50), torch.tensor([49, 49, 49]))  # the default: L-1
    with pytest.raises(ValueError, match="an integer l, a range A-B or all"):
        minority_targets("most", 3, 0, 50)


@pytest.mark.parametrize("method", ["minority", "standard", "mixture", "self-guided", "boost-skip"])
def test_each_method_defaults_to_the_ancestral_sampler_at_250_steps(tiny, tmp_path, capsys, method):
    _, _, run, _ = tiny
    extra = ("--sg-distance", "l2") if method == "self-guided" else ()
    s, _, first = _sample(capsys, tmp_path / "x.npz", "--n", 1, "--method", method, *extra, run=run,
                          classifier=method in ("minority", "mixture"))
    assert (s["sampler"], s["steps"]) == ("ddpm", 250), s
    assert "sampler ddpm (ancestral; default" in first and "250 steps (default for ddpm)" in first, first


def test_ddim_and_explicit_steps_and_the_cap_at_T(tiny, tmp_path, capsys):
    _, _, run, cos = tiny
    s, _, first = _sample(capsys, tmp_path / "d.npz", "--n", 1, "--sampler", "ddim", run=run)
    assert (s["sampler"], s["steps"]) == ("ddim", 50) and "sampler ddim (--sampler), 50 steps (default for ddim)" in first
    s, _, first = _sample(capsys, tmp_path / "e.npz", "--n", 1, "--steps", 7, run=run)
    assert (s["sampler"], s["steps"]) == ("ddpm", 7) and "7 steps (--steps)" in first
    s, _, first = _sample(capsys, tmp_path / "c.npz", "--n", 1, run=cos, classifier=False)  # T = 200 < 250
    assert (s["method"], s["sampler"], s["steps"]) == ("standard", "ddpm", 200)
    assert first.startswith("standard sampling;") and "200 steps (default for ddpm, capped at T = 200)" in first


@pytest.fixture(scope="module")
def cosine_bundle(tiny, tmp_path_factory):
    """``build --model`` a cosine-schedule model without --truth (its score's t is the default)."""
    _, data, _, cos = tiny
    out = tmp_path_factory.mktemp("cb") / "bundle"
    assert main(["build", "--data", str(data), "--out", str(out), "--model", str(cos), "--classes", str(L),
                 "--clf-steps", "3", "--clf-base-channels", "8", "--draws", "1", "--map", "pca"]) == 0
    return out


def test_build_scores_a_cosine_model_at_0_9T_by_default(cosine_bundle):
    m = json.loads((cosine_bundle / "manifest.json").read_text())
    assert (m["schedule"], m["T"]) == ("cosine", 200)
    assert m["score"]["t"] == 180 and m["score"]["distance"] == "unet-feat"  # 0.9T, the paper's for cosine
    assert m["config"]["sweep_t"] == [0.4, 0.6, 0.8, 0.9]  # the schedule's grid, recorded as used
    assert "app" not in m  # no --app-sampler: sample takes each method's own default


def test_build_sweeps_a_cosine_grid_that_holds_0_9T(tiny, tmp_path):
    from core.bundles.build import SWEEP_T, BuildConfig, build_bundle

    _, data, _, cos = tiny
    assert SWEEP_T["linear"] == (0.2, 0.4, 0.6, 0.8) and 0.9 in SWEEP_T["cosine"]
    assert len(SWEEP_T["cosine"]) == len(SWEEP_T["linear"])  # the sweep costs what it did
    shutil.copytree(data, tmp_path / "data")
    with open(tmp_path / "data" / "metadata.csv", "w") as f:  # every 8th image is the small (rare) disc
        f.write("path,rare\n" + "".join(f"img{i:03d}.png,{int(i % 8 == 0)}\n" for i in range(32)))
    m = build_bundle(tmp_path / "data", tmp_path / "b", tmp_path / "w", BuildConfig(
        model=str(cos), truth="rare", sweep_n=16, sweep_distances=("l2",), draws=1, classes=L, clf_steps=2,
        clf_base_channels=8, map_method="pca"), log=lambda _: None)
    assert sorted(r["t"] for r in m["sweep"]["rows"]) == [80, 120, 160, 180]
    assert m["score"]["t"] in (80, 120, 160, 180)


def test_a_bundles_app_sampler_and_steps_are_sample_defaults(cosine_bundle, tmp_path, capsys):
    bundle = tmp_path / "b"
    shutil.copytree(cosine_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())

    def with_app(app):
        (bundle / "manifest.json").write_text(json.dumps({**manifest, "app": app}))

    with_app({"sampler": "ddim", "steps": 7})
    s, _, first = _sample(capsys, tmp_path / "x.npz", "--bundle", bundle, "--n", 1)
    assert (s["method"], s["sampler"], s["steps"]) == ("minority", "ddim", 7)
    assert "sampler ddim (the bundle's app.sampler), 7 steps (the bundle's app.steps)" in first, first
    s, _, first = _sample(capsys, tmp_path / "x.npz", "--bundle", bundle, "--n", 1, "--steps", 3)
    assert (s["sampler"], s["steps"]) == ("ddim", 3)  # an explicit flag wins
    s, _, _ = _sample(capsys, tmp_path / "x.npz", "--bundle", bundle, "--n", 1, "--sampler", "ddpm")
    assert (s["sampler"], s["steps"]) == ("ddpm", 200)  # app.steps was recorded for DDIM
    s, _, first = _sample(capsys, tmp_path / "x.npz", "--bundle", bundle, "--n", 1, "--method", "boost-skip")
    assert (s["sampler"], s["steps"]) == ("ddpm", 200) and "default for boost-skip" in first  # DDIM saturates it
    with_app({"steps": 9})  # steps alone: for whatever sampler the run takes
    s, _, _ = _sample(capsys, tmp_path / "x.npz", "--bundle", bundle, "--n", 1)
    assert (s["sampler"], s["steps"]) == ("ddpm", 9)
    for bad in (0, 201, 1001, "7", True, 2.5):  # integer in [1, min(1000, T)]
        with_app({"steps": bad})
        capsys.readouterr()
        assert main(["sample", "--bundle", str(bundle), "--n", "1", "--out", str(tmp_path / "y.npz")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "'app.steps' must be an integer in [1, 200]" in err[0], err
    assert not (tmp_path / "y.npz").exists()


def test_precision_is_recorded_and_changes_only_what_it_should(tiny, tmp_path, capsys):
    """On a CPU auto is fp32: --precision fp32 gives auto's images bit for bit; bf16 and fp16 (CPU autocast runs
    both) differ by a few uint8 levels (measured on this model, 20 ancestral steps, w = 2: bf16 max 3, mean 0.21;
    fp16 max 1, mean 0.03)."""
    _, _, run, _ = tiny
    got = {}
    for p in ("auto", "fp32", "bf16", "fp16"):
        s, img, first = _sample(capsys, tmp_path / f"{p}.npz", "--n", 4, "--scale", 2, "--steps", 20,
                                "--precision", p, run=run)
        assert (s["precision"], s["precision_used"]) == (p, "fp32" if p == "auto" else p)
        assert f"precision {p}" + (" (fp32 on cpu)" if p == "auto" else "") in first, first
        got[p] = img.astype(int)
    assert np.array_equal(got["fp32"], got["auto"])
    for p in ("bf16", "fp16"):
        d = np.abs(got[p] - got["auto"])
        assert 0 < d.max() <= 16 and d.mean() < 1.0, (p, d.max(), d.mean())
    capsys.readouterr()
    assert main(["sample", "--model", str(run), "--n", "1", "--precision", "fp8", "--out", str(tmp_path / "z.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown --precision 'fp8'; allowed: auto, fp32, bf16, fp16" in err[0], err


def test_build_records_a_scheduler_and_its_steps_for_the_app(tiny, tmp_path, capsys):
    """Issue 26.3: `build --app-sampler dpmpp-2m --app-steps 10` records both in the manifest; sample --bundle and
    the app start from them; --app-steps without --app-sampler is one line."""
    _, data, _, cos = tiny
    out = tmp_path / "b"
    assert main(["build", "--data", str(data), "--out", str(out), "--model", str(cos), "--classes", str(L),
                 "--clf-steps", "2", "--clf-base-channels", "8", "--draws", "1", "--map", "pca",
                 "--app-sampler", "dpmpp-2m", "--app-steps", "10"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["app"] == {"sampler": "dpmpp-2m", "steps": 10}
    s, _, first = _sample(capsys, tmp_path / "x.npz", "--bundle", out, "--n", 1)
    assert (s["sampler"], s["steps"]) == ("dpmpp-2m", 10), first
    from app.handlers import app_defaults

    assert app_defaults(m) == ("DPM-Solver++ 2M", 10)
    capsys.readouterr()
    assert main(["build", "--data", str(data), "--out", str(tmp_path / "c"), "--model", str(cos), "--app-steps", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--app-steps needs --app-sampler" in err[0]
