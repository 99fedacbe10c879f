"""The four pipeline commands end to end on a few dozen images, and their bad-input behaviour."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--size", "16", "--channels", "1", "--widths", "8,16", "--batch-size", "8", "--no-attention"]


def make_images(folder: Path, n: int, seed: int = 0, rare_every: int = 8):
    """Grey 16x16 discs: most large, every ``rare_every``-th small (the minority)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:20, :20]
    for i in range(n):
        r = 3 if i % rare_every == 0 else 7
        cx, cy = 10 + rng.integers(-2, 3), 10 + rng.integers(-2, 3)
        img = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r) * 200.0 + rng.normal(0, 8, (20, 20))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"img{i:03d}.png")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipe")
    data, run = base / "data", base / "run"
    make_images(data, 32)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # one bad file: skipped, counted
    assert main(["train-diffusion", "--data", str(data), "--out", str(run), "--steps", "30", *TINY]) == 0
    assert main(["score", "--model", str(run), "--data", str(data), "--out", str(run / "scores.csv"),
                 "--distance", "l2", "--draws", "2", "--seed", "0"]) == 0
    assert main(["train-classifier", "--model", str(run), "--data", str(data), "--scores", str(run / "scores.csv"),
                 "--classes", "4", "--steps", "20", "--batch-size", "16", "--base-channels", "8",
                 "--channel-mult", "1,2", "--eval-every", "10", "--out", str(run / "classifier")]) == 0
    return base, data, run


def sample_args(run, out, **kw):
    args = {"--model": run, "--classifier": run / "classifier", "--minority-class": 3, "--scale": 2.5, "--n": 5,
            "--steps": 8, "--sampler": "ddim", "--seed": 0, "--out": out}
    args.update({f"--{k.replace('_', '-')}": v for k, v in kw.items()})
    flat = ["sample"]
    for k, v in args.items():
        if v is not None:
            flat += [k, str(v)]
    return flat


def test_pipeline_outputs(pipeline):
    base, data, run = pipeline
    assert (run / "model.safetensors").is_file() and (run / "train_state.safetensors").is_file()
    cfg = json.loads((run / "model.json").read_text())
    assert cfg["schema"] == 1 and cfg["kind"] == "diffusion" and cfg["step"] == 30
    lines = (run / "scores.csv").read_text().splitlines()
    assert lines[0] == "path,score,label"
    rows = [l.split(",") for l in lines[1:]]
    assert [r[0] for r in rows] == sorted(f"img{i:03d}.png" for i in range(32)), "stable sorted order, bad file skipped"
    assert all(float(r[1]) > 0 for r in rows)
    labels = [int(r[2]) for r in rows]  # filled in by train-classifier's categorisation
    assert sorted(set(labels)) == [0, 1, 2, 3] and np.bincount(labels).tolist() == [8, 8, 8, 8]
    meta = json.loads((run / "scores.json").read_text())
    assert meta["settings"] == {"distance": "l2", "t": 600, "draws": 2, "seed": 0, "clip": True}
    assert len(meta["thresholds"]) == 4 and meta["num_classes"] == 4
    assert meta["skipped"][0][0] == "broken.png"
    clf = json.loads((run / "classifier" / "classifier.json").read_text())
    assert {"val_loss", "val_acc", "val_mae", "val_rank_corr"} <= set(clf["metrics"]) and clf["num_val"] == 3
    assert set(clf["metrics"]) <= {"val_loss", "val_acc", "val_mae", "val_rank_corr", "val_acc_low_t", "val_mae_low_t"}
    assert clf["thresholds"] == meta["thresholds"]
    log = [json.loads(l) for l in (run / "classifier" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [10, 20]


def test_score_with_unet_feat_from_the_cli(pipeline, tmp_path):
    """--distance unet-feat builds its distance from the --model being scored; the CSV equals the library's score."""
    import torch

    from core.bundles.data import load_image_folder
    from core.nets.models import load_diffusion
    from core.maths.score import ScoreSettings, make_distance, minority_scores

    base, data, run = pipeline
    out = tmp_path / "s.csv"
    assert main(["score", "--model", str(run), "--data", str(data), "--out", str(out), "--distance", "unet-feat",
                 "--draws", "2", "--t", "0.5"]) == 0
    got = {r.split(",")[0]: float(r.split(",")[1]) for r in out.read_text().splitlines()[1:]}
    assert json.loads((tmp_path / "s.json").read_text())["settings"]["distance"] == "unet-feat"
    model = load_diffusion(run)
    imgs = load_image_folder(data, 16, 1)
    want = minority_scores(model, imgs.images, imgs.rows, ScoreSettings("unet-feat", 500, 2, 0),
                           make_distance("unet-feat", model=model))
    np.testing.assert_allclose([got[p] for p in imgs.paths], want, rtol=1e-5)
    assert np.all(want > 0)


def test_sample_npz_is_reproducible(pipeline, tmp_path):
    _, _, run = pipeline
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert main(sample_args(run, tmp_path / f"{name}.npz", seed=seed)) == 0
    a, b, c = (np.load(tmp_path / f"{n}.npz") for n in "abc")
    assert a["images"].dtype == np.uint8 and a["images"].shape == (5, 16, 16, 1)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes(), "same seed: byte-identical file"
    assert not np.array_equal(a["images"], c["images"])
    settings = json.loads(str(a["settings_json"]))
    assert settings["method"] == "minority" and settings["minority_class"] == 3 and settings["scale"] == 2.5
    assert int(a["seed"]) == 0 and str(a["sampler"]) == "ddim"


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_scale_zero_equals_standard_sampler(pipeline, tmp_path, sampler):
    _, _, run = pipeline
    assert main(sample_args(run, tmp_path / "g.npz", scale=0, sampler=sampler)) == 0
    assert main(sample_args(run, tmp_path / "s.npz", classifier=None, method="standard", sampler=sampler)) == 0
    assert main(sample_args(run, tmp_path / "w.npz", scale=8, sampler=sampler)) == 0
    g, s, w = (np.load(tmp_path / f"{n}.npz")["images"] for n in "gsw")
    assert np.array_equal(g, s)
    assert not np.array_equal(w, s), "a positive scale must change the samples"


@pytest.mark.parametrize("sampler", ["dpmpp-2m", "dpmpp-2m-sde", "unipc", "euler-a", "diffusers-ddim", "diffusers-ddpm"])
def test_diffusers_schedulers_sample_guided_and_unguided(pipeline, tmp_path, capsys, sampler):
    """Issue 26: every listed scheduler from the command line, guided (minority, a class range) and standard;
    the settings record it; self-guided and boost-skip with it are one line."""
    _, _, run = pipeline
    assert main(sample_args(run, tmp_path / "g.npz", sampler=sampler, minority_class="2-3")) == 0
    assert main(sample_args(run, tmp_path / "s.npz", sampler=sampler, classifier=None, method="standard")) == 0
    g, s = (np.load(tmp_path / f"{n}.npz") for n in "gs")
    assert g["images"].shape == (5, 16, 16, 1) and not np.array_equal(g["images"], s["images"])
    settings = json.loads(str(g["settings_json"]))
    assert settings["sampler"] == sampler and settings["steps"] == 8
    capsys.readouterr()
    for method in ("self-guided", "boost-skip"):
        assert main(sample_args(run, tmp_path / "x.npz", sampler=sampler, classifier=None, method=method)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--method {method} is defined for the samplers ddim, ddpm" in err[0], err
    assert not (tmp_path / "x.npz").exists()


def test_training_free_methods_from_the_cli(pipeline, tmp_path):
    _, _, run = pipeline
    std = sample_args(run, tmp_path / "s.npz", classifier=None, method="standard")
    assert main(std) == 0
    # gamma 1 / no skip and self-guided scale 0 reproduce the standard sampler exactly
    assert main(sample_args(run, tmp_path / "b1.npz", classifier=None, method="boost-skip", gamma=1, skip=0)) == 0
    assert main(sample_args(run, tmp_path / "g0.npz", classifier=None, method="self-guided", scale=0)) == 0
    assert main(sample_args(run, tmp_path / "b.npz", classifier=None, method="boost-skip", gamma=3, skip=2)) == 0
    assert main(sample_args(run, tmp_path / "g.npz", classifier=None, method="self-guided", scale=2,
                            interval=2, sg_distance="l2")) == 0
    s, b1, g0, b, g = (np.load(tmp_path / f"{n}.npz")["images"] for n in ("s", "b1", "g0", "b", "g"))
    assert np.array_equal(s, b1) and np.array_equal(s, g0)
    assert not np.array_equal(s, b) and not np.array_equal(s, g)
    settings = json.loads(str(np.load(tmp_path / "b.npz")["settings_json"]))
    assert settings["method"] == "boost-skip" and settings["gamma"] == 3 and settings["skip"] == 2
    # self-guidance through the unet-feat distance: its gradient flows through the model's own features
    assert main(sample_args(run, tmp_path / "gu.npz", classifier=None, method="self-guided", scale=2,
                            interval=2, sg_distance="unet-feat")) == 0
    gu = np.load(tmp_path / "gu.npz")["images"]
    assert gu.shape == s.shape and not np.array_equal(s, gu) and not np.array_equal(g, gu)


def test_minority_class_range_draws_each_samples_class(pipeline, tmp_path):
    """Issue 15.6: --minority-class A-B draws each sample's l uniformly from A..B (the paper's l ~ U{90..99}),
    seeded and independent of the batch size; one integer works as before."""
    import torch

    from core.maths.guidance import minority_targets

    _, _, run = pipeline
    assert main(sample_args(run, tmp_path / "r.npz", minority_class="1-3", n=6) + ["--batch-size", "4"]) == 0
    assert main(sample_args(run, tmp_path / "r2.npz", minority_class="1-3", n=6) + ["--batch-size", "6"]) == 0
    s = json.loads(str(np.load(tmp_path / "r.npz")["settings_json"]))
    assert s["minority_class"] == "1-3" and len(s["minority_classes"]) == 6
    assert set(s["minority_classes"]) <= {1, 2, 3}
    s2 = json.loads(str(np.load(tmp_path / "r2.npz")["settings_json"]))
    assert s2["minority_classes"] == s["minority_classes"]  # each sample's class does not depend on the batching
    draws = minority_targets("45-49", 20000, 0, 50)
    counts = np.bincount(draws.numpy(), minlength=50)
    assert counts[:45].sum() == 0 and abs(counts[45:] / 20000 - 0.2).max() < 0.02  # uniform over 45..49
    assert torch.equal(draws, minority_targets("45-49", 20000, 0, 50))
    assert not torch.equal(draws, minority_targets("45-49", 20000, 1, 50))
    assert torch.equal(minority_targets("7", 3, 0, 50), torch.tensor([7, 7, 7]))
    # a range whose ends are the same class is that class: the same images as the integer
    assert main(sample_args(run, tmp_path / "one.npz", minority_class="3-3")) == 0
    assert main(sample_args(run, tmp_path / "int.npz", minority_class=3)) == 0
    assert np.array_equal(np.load(tmp_path / "one.npz")["images"], np.load(tmp_path / "int.npz")["images"])


def test_self_guided_flags_reach_the_term(pipeline, tmp_path, capsys):
    """--sg-clip and --sg-count-from change the samples; --sg-distance auto says which fallback it took offline."""
    _, _, run = pipeline
    base = dict(classifier=None, method="self-guided", scale=2, interval=2, sg_distance="l2")
    outs = {}
    for name, extra in (("default", []), ("clip", ["--sg-clip"]), ("first", ["--sg-count-from", "first"])):
        assert main(sample_args(run, tmp_path / f"{name}.npz", **base) + extra) == 0
        outs[name] = np.load(tmp_path / f"{name}.npz")
    s = json.loads(str(outs["default"]["settings_json"]))
    assert s["sg_clip"] is False and s["sg_count_from"] == "last" and s["sg_distance_used"] == "l2"
    assert not np.array_equal(outs["default"]["images"], outs["first"]["images"])
    assert json.loads(str(outs["clip"]["settings_json"]))["sg_clip"] is True
    capsys.readouterr()
    assert main(sample_args(run, tmp_path / "auto.npz", **{**base, "sg_distance": "auto"})) == 0
    err = capsys.readouterr().err
    assert "AlexNet weights are not in the torch hub cache; using unet-feat" in err
    assert json.loads(str(np.load(tmp_path / "auto.npz")["settings_json"]))["sg_distance_used"] == "unet-feat"


BAD = [
    ({"method": "boost-skip", "skip": 8}, "--skip must be in [0, 7]"),
    ({"method": "boost-skip", "gamma": 0}, "--gamma must be > 0"),
    ({"method": "self-guided", "p": 1.2}, "--p must be in (0, 1)"),
    ({"method": "self-guided", "interval": 0}, "--interval must be >= 1"),
    ({"method": "self-guided", "sg_distance": "cosine"}, "allowed"),
    ({"minority_class": 4}, "--minority-class must be in [0, 4)"),
    ({"minority_class": -1}, "--minority-class must be in [0, 4)"),
    ({"minority_class": "2-9"}, "--minority-class must be in [0, 4)"),
    ({"minority_class": "3-1"}, "--minority-class range '3-1' runs backwards"),
    ({"minority_class": "rare"}, "--minority-class must be an integer l, a range A-B or all"),
    ({"scale": -1}, "--scale must be >= 0"),
    ({"n": 0}, "--n must be >= 1"),
    ({"steps": 0}, "--steps must be >= 1"),
    ({"steps": 5000}, "--steps must be in [1, 1000]"),
    ({"sampler": "euler"}, "allowed: ddim, ddpm"),
    ({"method": "magic"}, "allowed: standard, minority, mixture, self-guided, boost-skip"),
    ({"eta": 2}, "--eta must be in [0, 1]"),
]


@pytest.mark.parametrize("override,message", BAD)
def test_bad_sample_arguments(pipeline, tmp_path, capsys, override, message):
    _, _, run = pipeline
    assert main(sample_args(run, tmp_path / "x.npz", **override)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not (tmp_path / "x.npz").exists()


def test_bad_inputs_give_one_line(pipeline, tmp_path, capsys):
    base, data, run = pipeline
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    other = tmp_path / "other"
    # a checkpoint whose weights do not match its config
    other.mkdir()
    cfg = json.loads((run / "model.json").read_text())
    cfg["unet"]["block_out_channels"] = [8, 32]
    (other / "model.json").write_text(json.dumps(cfg))
    (other / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes())
    cases = [
        (["score", "--model", str(run), "--data", str(empty), "--out", str(tmp_path / "s.csv"), "--distance", "l2"], "no images found"),
        (["score", "--model", str(tmp_path / "nope"), "--data", str(data), "--out", str(tmp_path / "s.csv")], "no such folder"),
        (["score", "--model", str(other), "--data", str(data), "--out", str(tmp_path / "s.csv"), "--distance", "l2"], "has shape"),
        (["score", "--model", "someone/ddpm-model", "--data", str(data), "--out", str(tmp_path / "s.csv")], "HF_HUB_OFFLINE"),
        (["score", "--model", str(run), "--data", str(data), "--out", str(tmp_path / "s.csv")], "lpips-rand, ssim or l2"),
        (["score", "--model", str(run), "--data", str(data), "--out", str(tmp_path / "s.csv"), "--t", "1500", "--distance", "l2"], "--t must be"),
        (["train-diffusion", "--data", str(empty), "--out", str(tmp_path / "r"), "--steps", "-1"], "--steps must be >= 1"),
        (["train-diffusion", "--data", str(data), "--out", str(tmp_path / "r"), "--size", "18", "--widths", "8,16,16"], "must be a multiple of 4 for --widths 8,16,16"),
        (["train-diffusion", "--data", str(data), "--out", str(tmp_path / "r"), "--size", "0"], "--size must be in [8, 1024], got 0"),
        (["sample", "--model", str(run), "--method", "minority", "--classifier", str(run / "classifier"), "--minority-class", "3-1",
          "--out", str(tmp_path / "x.npz")], "runs backwards: A must be <= B"),
        (["train-classifier", "--model", str(run), "--data", str(data), "--scores", str(tmp_path / "none.csv"),
          "--out", str(tmp_path / "c")], "no such file"),
        (["sample", "--model", str(run), "--method", "minority", "--out", str(tmp_path / "x.npz")], "needs --classifier"),
        (["score", "--bogus"], "the following arguments are required: --data, --out"),
        (["score", "--data", "d", "--out", "o.csv"], "give --model (with the score flags) or --bundle"),
        (["score", "--model", str(run), "--data", str(data), "--out", "x.csv", "--bogus"], "unrecognized arguments: --bogus"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)
    assert not (tmp_path / "s.csv").exists() and not (tmp_path / "r").exists() and not (tmp_path / "c").exists()


def _env(threads: int):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    return env


def test_error_is_one_line_from_the_shell(tmp_path):
    r = subprocess.run([sys.executable, "-m", "core", "sample", "--model", str(tmp_path / "missing"), "--out",
                        str(tmp_path / "x.npz")], capture_output=True, text=True, env=_env(2), cwd=ROOT, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: --model {tmp_path / 'missing'}: no such folder"]


def test_score_in_two_processes_equals_one(pipeline, tmp_path):
    """torchrun with 2 CPU processes (gloo): the same table row for row (same thread count per process)."""
    _, data, run = pipeline
    common = ["-m", "core", "score", "--model", str(run), "--data", str(data), "--distance", "l2", "--draws", "2",
              "--batch-size", "5"]
    one = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one.csv")], env=_env(1), cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                          *common, "--out", str(tmp_path / "two.csv")], env=_env(1), cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert json.loads((tmp_path / "two.json").read_text())["processes"] == 2
    assert (tmp_path / "one.csv").read_text() == (tmp_path / "two.csv").read_text()


def test_class_conditional_end_to_end(tmp_path):
    data = tmp_path / "data"
    make_images(data / "cats", 24, seed=1)
    make_images(data / "dogs", 24, seed=2, rare_every=5)
    run = tmp_path / "run"
    assert main(["train-diffusion", "--data", str(data), "--out", str(run), "--steps", "10", "--class-cond", *TINY]) == 0
    assert json.loads((run / "model.json").read_text())["class_names"] == ["cats", "dogs"]
    assert main(["score", "--model", str(run), "--data", str(data), "--out", str(run / "scores.csv"),
                 "--distance", "ssim", "--draws", "1"]) == 0
    header = (run / "scores.csv").read_text().splitlines()[0]
    assert header == "path,score,label,class"
    assert main(["train-classifier", "--model", str(run), "--data", str(data), "--scores", str(run / "scores.csv"),
                 "--classes", "3", "--per-class", "--steps", "5", "--base-channels", "8", "--channel-mult", "1,2",
                 "--out", str(run / "clf")]) == 0
    meta = json.loads((run / "scores.json").read_text())
    assert set(meta["thresholds"]) == {"0", "1"} and meta["per_class"] is True
    clf = json.loads((run / "clf" / "classifier.json").read_text())
    assert clf["config"]["num_classes"] == 2
    base = ["sample", "--model", str(run), "--classifier", str(run / "clf"), "--minority-class", "2", "--scale", "2",
            "--n", "3", "--steps", "5", "--out", str(tmp_path / "c.npz")]
    assert main(base) == 2, "a class-conditional model needs --class-label"
    assert main(base + ["--class-label", "1"]) == 0
    assert np.load(tmp_path / "c.npz")["images"].shape == (3, 16, 16, 1)
    assert main(base + ["--class-label", "1", "--method", "mixture"]) == 0
    # D.9: an extra classifier on top of minority guidance
    assert main(base + ["--class-label", "1", "--extra-classifier", str(run / "clf"), "--extra-class", "0"]) == 0
    assert main(base + ["--class-label", "1", "--extra-classifier", str(run / "clf"), "--extra-class", "7"]) == 2


def test_diffusers_unet_folder_as_model(tmp_path):
    """A pretrained diffusers UNet2DModel folder (safetensors + scheduler config) skips train-diffusion."""
    import torch
    from diffusers import UNet2DModel

    from core.nets.models import UNetConfig, load_diffusion

    torch.manual_seed(0)
    net = UNet2DModel(**UNetConfig(16, 1, (8, 16), attention=False).diffusers_kwargs())
    folder = tmp_path / "pretrained"
    net.save_pretrained(folder / "unet", safe_serialization=True)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 500}))
    model = load_diffusion(folder)
    assert model.schedule.name == "cosine" and model.schedule.T == 500 and model.image_size == 16
    data = tmp_path / "data"
    make_images(data, 6)
    assert main(["score", "--model", str(folder), "--data", str(data), "--out", str(tmp_path / "s.csv"),
                 "--distance", "l1", "--draws", "1"]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["settings"]["t"] == 450  # 0.9 T for cosine
    assert main(["sample", "--model", str(folder), "--n", "2", "--steps", "4", "--out", str(tmp_path / "x.npz")]) == 0
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    assert main(["sample", "--model", str(folder), "--n", "2", "--steps", "4", "--out", str(tmp_path / "y.npz")]) == 2


def test_score_with_stored_thresholds_labels_new_data(pipeline, tmp_path):
    _, data, run = pipeline
    fresh = tmp_path / "fresh"
    make_images(fresh, 10, seed=9)
    assert main(["score", "--model", str(run), "--data", str(fresh), "--out", str(tmp_path / "new.csv"),
                 "--distance", "l2", "--draws", "2", "--thresholds", str(run / "scores.json")]) == 0
    from core.maths.categorize import categorize

    th = json.loads((run / "scores.json").read_text())["thresholds"]
    rows = [l.split(",") for l in (tmp_path / "new.csv").read_text().splitlines()[1:]]
    scores = np.array([float(r[1]) for r in rows])
    assert [int(r[2]) for r in rows] == categorize(scores, np.array(th)).tolist()
    assert json.loads((tmp_path / "new.json").read_text())["thresholds"] == th


def test_sample_in_two_processes_equals_one(pipeline, tmp_path):
    _, _, run = pipeline
    # --num-samples: torchrun's own parser would read --n as an abbreviation of its --nnodes/--nproc-per-node
    common = ["-m", "core", *sample_args(run, "X", n=None, num_samples=6, batch_size=2, steps=4)]
    one = subprocess.run([sys.executable, *[a if a != "X" else str(tmp_path / "one.npz") for a in common]],
                         env=_env(1), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534",
                          *[a if a != "X" else str(tmp_path / "two.npz") for a in common]],
                         env=_env(1), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = np.load(tmp_path / "one.npz")["images"], np.load(tmp_path / "two.npz")["images"]
    assert a.shape == (6, 16, 16, 1) and np.array_equal(a, b)
