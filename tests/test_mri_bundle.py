"""MRI phantom data, NIfTI input, and bundles (build, load, bad bundles)."""
import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from core.bundles.bundle import check_bundle, load_bundle, project
from core.cli import main
from core.bundles.data import load_image_folder, load_nifti_slices
from core.bundles.demo import DemoConfig
from core.errors import CheckpointError, InvalidImageError
from core.demos.phantom import _templates, build_mri_phantom, render_atrophy, slice_maps


def test_phantom_is_deterministic_and_long_tailed(tmp_path):
    a = build_mri_phantom(tmp_path / "a", n=40, size=16, seed=3)
    b = build_mri_phantom(tmp_path / "b", n=40, size=16, seed=3)
    assert (a / "metadata.csv").read_text() == (b / "metadata.csv").read_text()
    assert all((a / "images" / p.name).read_bytes() == p.read_bytes() for p in (b / "images").iterdir())
    with open(a / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"path", "severity", "z", "angle", "shift_x", "shift_y", "intensity", "bias", "noise"} <= set(rows[0])
    assert (a / rows[0]["path"]).is_file()
    sev = np.array([float(r["severity"]) for r in rows])
    assert sev.min() >= 0 and sev.max() <= 1
    data = load_image_folder(a, 16, 1)
    assert len(data) == 40 and data.images.shape == (40, 1, 16, 16)


def test_atrophy_turns_tissue_into_csf_monotonically():
    maps = slice_maps(_templates(), 90)
    brain = maps.brain
    means = [float(render_atrophy(maps, s)[brain].mean()) for s in (0.0, 0.3, 0.6, 1.0)]
    assert means == sorted(means, reverse=True) and means[0] - means[-1] > 0.05, means
    assert np.allclose(render_atrophy(maps, 0.0)[brain], maps.t1[brain])


def _vol(path: Path, data: np.ndarray):
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def test_nifti_slices_and_bad_volumes(tmp_path):
    vol = np.random.default_rng(0).random((40, 48, 30)).astype(np.float32)
    # a smooth ramp whose scale differs per slice: per-slice min-max makes every slice the same picture
    ramp = np.linspace(0, 1, 40, dtype=np.float32)[:, None, None] * np.ones((40, 48, 30), np.float32)
    _vol(tmp_path / "ramp.nii.gz", ramp * (np.arange(30, dtype=np.float32) * 50 + 7)[None, None, :])
    slices = load_nifti_slices(tmp_path / "ramp.nii.gz", 16, (0.4, 0.6))
    assert [z for z, _ in slices] == list(range(12, 18))
    assert all(a.dtype == np.uint8 and a.shape == (1, 16, 16) for _, a in slices)
    assert all(np.array_equal(a, slices[0][1]) for _, a in slices) and slices[0][1].max() >= 250
    _vol(tmp_path / "ok.nii.gz", vol)
    bad = tmp_path / "bad"
    bad.mkdir()
    _vol(bad / "flat.nii", np.random.rand(20, 20).astype(np.float32))  # 2-D
    _vol(bad / "time.nii.gz", np.random.rand(8, 8, 8, 3).astype(np.float32))  # 4-D
    nan = vol.copy()
    nan[5, 5, 15] = np.nan
    _vol(bad / "nan.nii", nan)
    (bad / "empty.nii").write_bytes(b"")
    (bad / "random.nii.gz").write_bytes(np.random.default_rng(1).bytes(3000))
    (bad / "png.nii").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 400)
    full = (tmp_path / "ok.nii.gz").read_bytes()
    (bad / "cut.nii.gz").write_bytes(full[: len(full) // 2])
    _vol(bad / "cut.nii", vol)
    raw = (bad / "cut.nii").read_bytes()
    (bad / "cut.nii").write_bytes(raw[: len(raw) // 2])
    huge = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    huge.header.set_data_shape((32767, 32767, 32767))
    (bad / "huge.nii").write_bytes(huge.header.binaryblock + b"\0" * 64)
    for f in sorted(bad.iterdir()):
        with pytest.raises(InvalidImageError, match=f.name):
            load_nifti_slices(f, 16)
    _vol(bad / "good.nii", vol)
    data = load_image_folder(bad, 16, 1)
    assert {p.split("#")[0] for p in data.paths} == {"good.nii"} and len(data.skipped) == 9


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "bundle"
    assert main(["build-demo", "--out", str(out), "--n", "60", "--size", "16", "--widths", "8,16", "--diffusion-steps", "4",
                 "--sweep-n", "20", "--draws", "1", "--classes", "4", "--clf-steps", "4", "--clf-base-channels", "8", "--map", "pca"]) == 0
    return out


def test_build_demo_bundle_loads_in_one_call(bundle, tmp_path):
    b = load_bundle(bundle)
    m = b.manifest
    for key in ("schema_version", "dataset", "image_size", "schedule", "T", "num_classes", "thresholds", "score",
                "seeds", "training", "versions", "files"):
        assert key in m, key
    cfg = DemoConfig()
    assert m["num_classes"] == 4 and len(m["thresholds"]) == 4
    assert len(m["sweep"]["rows"]) == len(cfg.sweep_distances) * len(cfg.sweep_t)  # every distance x timestep
    assert {r["distance"] for r in m["sweep"]["rows"]} == set(cfg.sweep_distances) and "unet-feat" in cfg.sweep_distances
    assert b.real.images.shape == (60, 16, 16, 1) and b.real.coords.shape == (60, 2)
    assert set(np.unique(b.real.label)) <= set(range(4)) and np.all((b.real.truth >= 0) & (b.real.truth <= 1))
    xy = project(b.real, b.real.images[:3])
    assert xy.shape == (3, 2) and np.isfinite(xy).all()
    assert main(["sample", "--bundle", str(bundle), "--minority-class", "3", "--scale", "2", "--n", "2", "--steps", "3",
                 "--out", str(tmp_path / "s.npz")]) == 0
    assert np.load(tmp_path / "s.npz")["images"].shape == (2, 16, 16, 1)


def test_build_demo_rescores_and_retrains_when_score_settings_change(bundle, tmp_path, capsys):
    import shutil

    work = tmp_path / "work"
    shutil.copytree(f"{bundle}.work", work)
    old = json.loads((work / "scores.json").read_text())
    args = ["build-demo", "--out", str(tmp_path / "b2"), "--work", str(work), "--n", "60", "--size", "16", "--widths", "8,16",
            "--diffusion-steps", "4", "--sweep-n", "20", "--draws", "1", "--classes", "4", "--clf-steps", "4",
            "--clf-base-channels", "8", "--map", "pca", "--score-distance", "l1", "--score-t", "0.3"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "rescoring" in err and "retraining" in err
    m = json.loads((tmp_path / "b2" / "manifest.json").read_text())
    assert (m["score"]["distance"], m["score"]["t"]) == ("l1", 300) != (old["distance"], old["t"])
    clf = json.loads((tmp_path / "b2" / "classifier.json").read_text())
    assert clf["score_settings"]["t"] == 300
    assert main(args) == 0  # same settings again: both cached
    err = capsys.readouterr().err
    assert "rescoring" not in err and "retraining" not in err and "sweeping again" not in err


def test_build_demo_sweeps_again_when_the_sweep_settings_change(bundle, tmp_path, capsys):
    """A work folder's sweep.json of other distances, timesteps or size is redone, not silently reused."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(f"{bundle}.work", work)
    sweep = json.loads((work / "sweep.json").read_text())
    sweep["rows"] = [r for r in sweep["rows"] if r["distance"] != "unet-feat"]  # as written before unet-feat existed
    (work / "sweep.json").write_text(json.dumps(sweep))
    args = ["build-demo", "--out", str(tmp_path / "b2"), "--work", str(work), "--n", "60", "--size", "16", "--widths", "8,16",
            "--diffusion-steps", "4", "--sweep-n", "20", "--draws", "1", "--classes", "4", "--clf-steps", "4",
            "--clf-base-channels", "8", "--map", "pca"]
    assert main(args) == 0
    assert "sweeping again" in capsys.readouterr().err
    m = json.loads((tmp_path / "b2" / "manifest.json").read_text())
    assert "unet-feat" in {r["distance"] for r in m["sweep"]["rows"]} and m["sweep"]["n"] == 20
    assert main(args + ["--sweep-n", "12"]) == 0  # another sweep size: redone again
    assert "sweeping again" in capsys.readouterr().err
    assert json.loads((tmp_path / "b2" / "manifest.json").read_text())["sweep"]["n"] == 12


def test_build_demo_refuses_an_unusable_score_distance_before_any_work(tmp_path, monkeypatch, capsys):
    import core.maths.score

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(core.maths.score, "lpips_weights_present", lambda net="vgg": False)
    assert main(["build-demo", "--out", str(tmp_path / "b"), "--score-distance", "lpips"]) == 2
    assert "cannot be downloaded offline" in capsys.readouterr().err
    assert not (tmp_path / "b.work").exists()


def test_damaged_bundles_are_refused(bundle, tmp_path, capsys):
    import shutil

    for case in ("missing", "schema", "edited"):
        bad = tmp_path / case
        shutil.copytree(bundle, bad)
        if case == "missing":
            (bad / "classifier.safetensors").unlink()
            match = "missing file classifier.safetensors"
        elif case == "schema":
            m = json.loads((bad / "manifest.json").read_text())
            m["schema_version"] = 99
            (bad / "manifest.json").write_text(json.dumps(m))
            match = "schema version 99"
        else:
            (bad / "real.csv").write_text("path,score\n")
            match = "real.csv does not match"
        with pytest.raises(CheckpointError, match=match):
            check_bundle(bad)
        assert main(["sample", "--bundle", str(bad), "--out", str(tmp_path / "x.npz")]) == 2
        assert match in capsys.readouterr().err
    assert main(["build-demo", "--out", str(tmp_path / "z"), "--n", "0"]) == 2


def test_score_new_data_with_a_bundle(tmp_path, capsys):
    """Issue 18.3 (command line): `score --bundle B --data DIR` scores new images with the bundle's model,
    distance, t, draws and seed, labels them with its thresholds and places them among its real data."""
    import torch
    from PIL import Image

    from core.bundles.bundle import load_bundle
    from core.maths.categorize import categorize
    from core.bundles.data import load_image_folder
    from core.maths.score import ScoreSettings, make_distance, minority_scores

    shipped = Path(__file__).resolve().parent.parent / "assets" / "mri-atrophy"
    b = load_bundle(shipped)
    folder = tmp_path / "scans"
    folder.mkdir()
    for i in (0, 1500, 4242):
        Image.fromarray(b.real.images[i][..., 0]).save(folder / f"scan{i}.png")
    out = tmp_path / "scores.csv"
    assert main(["score", "--bundle", str(shipped), "--data", str(folder), "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert [r["path"] for r in rows] == ["scan0.png", "scan1500.png", "scan4242.png"]
    data = load_image_folder(folder, 32, 1)
    m = b.manifest["score"]
    st = ScoreSettings(m["distance"], int(m["t"]), int(m["draws"]), int(m["seed"]), bool(m.get("clip", True)))
    want = minority_scores(b.model, data.images, torch.arange(3), st, make_distance(st.distance, seed=st.seed, model=b.model))
    np.testing.assert_allclose([float(r["score"]) for r in rows], want, rtol=1e-5)
    assert [int(r["label"]) for r in rows] == categorize(want.astype(np.float64), np.array(b.manifest["thresholds"])).tolist()
    pct = [100 * (b.real.score < s).mean() for s in want]
    np.testing.assert_allclose([float(r["percentile"]) for r in rows], pct, atol=0.01)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["settings"]["distance"] == m["distance"] and meta["bundle"] == str(shipped)
    for extra, msg in ((["--draws", "3"], "drop --draws"), (["--model", str(shipped)], "give --model")):
        capsys.readouterr()
        assert main(["score", "--bundle", str(shipped), "--data", str(folder), "--out", str(tmp_path / "x.csv"), *extra]) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()
