"""Issue 17: `build` on any folder (grey, colour, NIfTI, class sub-folders), metadata.csv and --truth, a given
--model, the faces demo, and every bad-input row: one clear line each, nothing lost."""
import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from core.bundles.bundle import load_bundle
from core.cli import main
from core.demos.faces import ATTRIBUTES, RARE_VALUES, build_faces, expected_rare_share, rare_count, rarity_of

TINY = ["--size", "16", "--widths", "8,16", "--diffusion-steps", "3", "--clf-steps", "3", "--clf-base-channels", "8",
        "--draws", "1", "--classes", "4", "--map", "pca", "--sweep-n", "16"]


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    out = tmp_path_factory.mktemp("faces") / "data"
    build_faces(out, n=48, size=16, seed=3)
    return out


@pytest.fixture(scope="module")
def colour_bundle(faces, tmp_path_factory):
    out = tmp_path_factory.mktemp("cb") / "faces-bundle"
    assert main(["build", "--data", str(faces), "--out", str(out), "--channels", "3", "--truth", "rarity", *TINY]) == 0
    return out


def test_faces_are_deterministic_long_tailed_and_carry_their_rarity(tmp_path, faces):
    again = tmp_path / "again"
    build_faces(again, n=48, size=16, seed=3)
    assert (again / "metadata.csv").read_bytes() == (faces / "metadata.csv").read_bytes()
    assert all((again / f"images/{i:05d}.png").read_bytes() == (faces / f"images/{i:05d}.png").read_bytes()
               for i in range(48))
    rows = list(csv.DictReader(open(faces / "metadata.csv")))
    codes = {a: np.array([int(r[a]) for r in rows]) for a in ATTRIBUTES}
    # rarity = -sum log p of the face's values, and the rare count counts values of frequency <= 6 %
    want = sum(-np.log([ATTRIBUTES[a][c][1] for c in codes[a]]) for a in ATTRIBUTES)
    assert np.allclose([float(r["rarity"]) for r in rows], want, atol=1e-4)
    assert np.allclose(rarity_of(codes), want)
    assert [int(r["rare_attributes"]) for r in rows] == rare_count(codes).tolist()
    assert ("eyeglasses", "yes") in RARE_VALUES and ("hat", "yes") in RARE_VALUES
    img = np.asarray(Image.open(faces / "images/00000.png"))
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8 and img.std() > 10
    # the frequencies hold on a large draw (no rendering: only the attribute draw)
    from core.demos.faces import draw_attributes

    big = draw_attributes(np.random.default_rng(0), 40_000)
    assert abs((big["eyeglasses"] == 1).mean() - 0.06) < 0.005 and abs((big["hat"] == 1).mean() - 0.05) < 0.005
    assert abs((rare_count(big) > 0).mean() - expected_rare_share()) < 0.01


def test_data_faces_command(tmp_path, capsys):
    assert main(["data", "faces", "--out", str(tmp_path / "f"), "--n", "5", "--size", "8"]) == 0
    assert len(list((tmp_path / "f/images").glob("*.png"))) == 5 and "rare attribute" in capsys.readouterr().err


def test_colour_build_end_to_end(colour_bundle, tmp_path):
    b = load_bundle(colour_bundle)
    m = b.manifest
    assert m["channels"] == 3 and b.real.images.shape == (48, 16, 16, 3) and b.model.channels == 3
    assert m["dataset"]["truth"] == "rarity" and b.real.truth_name == "rarity"
    assert m["sweep"]["truth"] == "rarity" and len(m["sweep"]["rows"]) == 20  # 5 distances x 4 timesteps
    assert np.isfinite(m["score"]["spearman_vs_truth"]) and set(m["stage_seconds"]) >= {"diffusion", "score"}
    # every numeric metadata.csv column travels, aligned to the bundle's rows
    assert set(b.real.metadata) == set(ATTRIBUTES) | {"rare_attributes", "rarity"}
    assert np.allclose(b.real.truth, b.real.metadata["rarity"], atol=1e-4)
    # the other commands take the colour bundle unchanged
    out = tmp_path / "s.npz"
    assert main(["sample", "--bundle", str(colour_bundle), "--minority-class", "3", "--scale", "1", "--n", "6",
                 "--steps", "3", "--out", str(out)]) == 0
    assert np.load(out)["images"].shape[-1] == 3
    rep = tmp_path / "rep"
    assert main(["evaluate", "--real", str(colour_bundle), "--generated", str(out), "--out", str(rep),
                 "--features", "classifier", "--baseline-top", "1.0"]) == 0
    assert (rep / "report.json").is_file()


def test_colour_bundle_in_the_app(colour_bundle):
    from app import handlers as h

    studio = h.Studio(colour_bundle)
    run = studio.generate_all(h.GenerateRequest(3, 1.0, steps=5, n=2))
    assert run.guided.shape == (2, 16, 16, 3) and np.isfinite(run.guided_score).all()
    items, _, info = h.on_browse(studio, "rarity: high first", "all", 1, "hat = 0")
    real = studio.bundle.real
    shown = [float(c.split("rarity ")[1].split(" ")[0]) for _, c in items]
    assert shown == sorted(shown, reverse=True) and "rarity" in info and "hat 0" in items[0][1]
    # the filter keeps exactly the hat = 0 rows: every caption shown says so, and the count is theirs
    n_hat0 = int((real.metadata["hat"] == 0).sum())
    assert 0 < n_hat0 < len(real.score), n_hat0  # the tiny data has both kinds, so the filter has work to do
    assert all(" · hat 0 " in c + " " for _, c in items) and not any(" · hat 1 " in c + " " for _, c in items)
    assert f"{n_hat0} of {len(real.score)} real images" in info, info
    pages = -(-n_hat0 // 24)
    assert len(items) == min(24, n_hat0) and f"of {pages} " in info
    text, strip = h.on_class(studio, 3)
    assert "true rarity median" in text and strip.shape[2] == 3
    assert studio.atrophy(run.guided) is None  # no reader of the rarity column: no estimate in the captions
    with pytest.raises(h.MinorityError, match="columns: "):
        h.on_browse(studio, "most unique first", "all", 1, "nonsense > 2")
    dens, fig = h.on_density(studio, h.Visit().add(run))
    assert dens is not None and fig is not None


def test_build_resumes_and_keeps_the_bundle_whole(faces, tmp_path, capsys):
    out = tmp_path / "b"
    args = ["build", "--data", str(faces), "--out", str(out), "--channels", "3", *TINY]
    assert main(args) == 0
    first = json.loads((out / "manifest.json").read_text())
    assert first["sweep"] is None and first["score"]["distance"] == "unet-feat"  # the documented default
    assert (first["schedule"], first["score"]["t"]) == ("linear", 600)  # the paper's t for a linear schedule
    capsys.readouterr()
    assert main(args) == 0  # a rerun resumes every stage: nothing trained or scored again
    err = capsys.readouterr().err
    assert "2/6 diffusion model: 3 steps" not in err and "4/6 minority score" not in err
    again = json.loads((out / "manifest.json").read_text())
    assert again["files"] == first["files"]


def test_metadata_and_truth_errors(tmp_path, faces, capsys):
    data = tmp_path / "d"
    (data / "images").mkdir(parents=True)
    for i in range(10):
        Image.fromarray(np.full((8, 8, 3), i * 20, np.uint8)).save(data / f"images/{i}.png")
    base = ["build", "--data", str(data), "--out", str(tmp_path / "o"), *TINY]
    assert main([*base, "--truth", "rarity"]) == 2
    assert "has no metadata.csv" in _err(capsys)
    (data / "metadata.csv").write_text("path,grade,site\n" + "".join(f"images/{i}.png,{i},A{i}\n" for i in range(10)))
    assert main([*base, "--truth", "site"]) == 2
    assert "not numeric" in _err(capsys) and not (tmp_path / "o").exists()
    assert main([*base, "--truth", "nope"]) == 2
    assert "no such column; numeric columns: grade" in _err(capsys)
    (data / "metadata.csv").write_text("path,grade\nimages/0.png,1\nimages/missing.png,2\n")
    assert main([*base]) == 2
    assert "line 3: 'images/missing.png' is not a file" in _err(capsys)
    (data / "metadata.csv").write_text("name,grade\nimages/0.png,1\n")
    assert main([*base]) == 2
    assert "needs a 'path' column" in _err(capsys)
    for outside in ("/etc/passwd", "../../../../../../etc/hostname", "images/../../d/images/0.png"):
        (data / "metadata.csv").write_text(f"path,grade\nimages/0.png,1\n{outside},2\n")
        assert main([*base]) == 2
        assert f"line 3: {outside!r} is not a path inside --data" in _err(capsys)  # named, never looked up
    (data / "metadata.csv").write_text("path,grade\nimages/0.png,1\nimages/1.png,2\nimages/0.png,9\n")
    assert main([*base]) == 2
    assert "line 4: 'images/0.png' already has a row (line 2) with other values" in _err(capsys)
    assert not (tmp_path / "o").exists()


def test_metadata_reserved_columns_and_repeated_rows_are_reported(tmp_path):
    from core.bundles.build import read_metadata

    data = tmp_path / "d"
    (data / "images").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((8, 8), i * 20, np.uint8)).save(data / f"images/{i}.png")
    (data / "metadata.csv").write_text("path,score,x,grade\nimages/0.png,5,1,7\nimages/0.png,5,1,7\nimages/2.png,1,2,3\n")
    numeric, ignored, notes = read_metadata(data, ["images/0.png", "images/1.png", "images/2.png"])
    assert list(numeric) == ["grade"] and ignored == []
    assert np.array_equal(numeric["grade"], [7, np.nan, 3], equal_nan=True)
    assert any("column(s) score, x not carried" in n for n in notes), notes
    assert any("1 repeated identical row(s)" in n for n in notes), notes


def test_work_or_out_inside_the_data_folder_is_refused(faces, tmp_path, capsys):
    before = sorted(p.name for p in faces.iterdir())
    for extra, message in ((["--work", str(faces)], "--work"), (["--work", str(faces / "w")], "--work"),
                           (["--out", str(faces / "b")], "--out")):
        args = ["build", "--data", str(faces), "--out", str(tmp_path / "o"), "--channels", "3", *TINY, *extra]
        assert main(args) == 2
        err = _err(capsys)
        assert f"{message} " in err and "lies inside --data" in err, err
    assert sorted(p.name for p in faces.iterdir()) == before  # nothing written among the images


def test_tiny_and_mixed_data_are_refused(tmp_path, capsys):
    data = tmp_path / "tiny"
    data.mkdir()
    for i in range(5):
        Image.fromarray(np.full((8, 8), i * 40, np.uint8)).save(data / f"{i}.png")
    assert main(["build", "--data", str(data), "--out", str(tmp_path / "o"), *TINY]) == 2
    assert "5 image(s) is too few for --classes 4 (at least 2 per class, 8 in all)" in _err(capsys)
    nib.save(nib.Nifti1Image(np.random.rand(8, 8, 8).astype(np.float32), np.eye(4)), str(data / "v.nii.gz"))
    assert main(["build", "--data", str(data), "--out", str(tmp_path / "o"), *TINY]) == 2
    assert "mixes 1 NIfTI volumes with 5 images" in _err(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["build", "--data", str(empty), "--out", str(tmp_path / "o"), *TINY]) == 2
    assert "no images found" in _err(capsys)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_nifti_folder_builds(tmp_path):
    data = tmp_path / "nii"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        nib.save(nib.Nifti1Image(rng.random((12, 12, 10)).astype(np.float32), np.eye(4)), str(data / f"s{i}.nii.gz"))
    (data / "metadata.csv").write_text("path,age\n" + "".join(f"s{i}.nii.gz,{60 + i}\n" for i in range(4)))
    out = tmp_path / "b"
    assert main(["build", "--data", str(data), "--out", str(out), *TINY]) == 0
    b = load_bundle(out)
    assert b.real.paths[:2] == ["s0.nii.gz#z004", "s0.nii.gz#z005"] and len(b.real.paths) == 8  # z 4, 5 of 10
    assert sorted(set(b.real.metadata["age"])) == [60, 61, 62, 63]  # each slice takes its volume's row


def test_out_holding_another_bundle_is_refused_unless_forced(colour_bundle, faces, tmp_path, capsys):
    import shutil

    out = tmp_path / "taken"
    shutil.copytree(colour_bundle, out)
    before = (out / "manifest.json").read_bytes()
    args = ["build", "--data", str(faces), "--out", str(out), "--name", "other", "--work", str(tmp_path / "w"), *TINY]
    assert main(args) == 2
    assert "already holds the bundle 'faces-bundle'; pass --force" in _err(capsys)
    assert (out / "manifest.json").read_bytes() == before  # nothing lost
    assert main([*args, "--force"]) == 0 and json.loads((out / "manifest.json").read_text())["name"] == "other"
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("precious")
    assert main(["build", "--data", str(faces), "--out", str(notes), "--work", str(tmp_path / "w2"), *TINY]) == 2
    assert "not empty and not a bundle" in _err(capsys) and (notes / "thesis.tex").read_text() == "precious"


def test_given_model_sets_size_and_channels(colour_bundle, faces, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["build", "--data", str(faces), "--out", str(out), "--model", str(colour_bundle), "--size", "32",
                 *TINY[2:]]) == 2
    assert "--size 32 disagrees with --model" in _err(capsys) and not out.exists()
    assert main(["build", "--data", str(faces), "--out", str(out), "--model", str(colour_bundle), "--channels", "1",
                 *TINY[2:]]) == 2
    assert "--channels 1 disagrees with --model" in _err(capsys)
    assert main(["build", "--data", str(faces), "--out", str(out), "--model", str(colour_bundle), *TINY[2:]]) == 0
    b = load_bundle(out)
    assert b.manifest["channels"] == 3 and b.manifest["image_size"] == 16 and b.manifest["training"]["model"]
    src = load_bundle(colour_bundle).model.net.state_dict()
    assert all(np.array_equal(v.numpy(), src[k].numpy()) for k, v in b.model.net.state_dict().items())


def test_diffusers_model_is_written_into_the_bundle(faces, tmp_path):
    """A diffusers UNet2DModel folder as --model: the bundle holds it as a run folder that loads back equal."""
    from diffusers import UNet2DModel

    from core.nets.models import load_diffusion

    net = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                      down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                      norm_num_groups=4)
    folder = tmp_path / "unet"
    net.save_pretrained(folder, safe_serialization=True)
    (folder / "scheduler_config.json").write_text(json.dumps({"beta_schedule": "linear", "num_train_timesteps": 1000}))
    out = tmp_path / "b"
    assert main(["build", "--data", str(faces), "--out", str(out), "--model", str(folder), *TINY[2:]]) == 0
    a, b = load_diffusion(folder), load_diffusion(out)
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([5, 500])
    assert torch.equal(a(x, t), b(x, t)) and b.schedule.T == 1000


def test_a_build_killed_while_writing_the_bundle_keeps_the_old_one_and_resumes(faces, tmp_path, monkeypatch, capsys):
    import core.bundles.build as build
    from core.bundles.bundle import check_bundle

    out = tmp_path / "b"
    args = ["build", "--data", str(faces), "--out", str(out), "--channels", "3", *TINY]
    assert main(args) == 0
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    real = build.save_tensors_streamed

    def killed(path, tensors, streamed):
        raise KeyboardInterrupt  # the process dies between the model files and real.safetensors

    monkeypatch.setattr(build, "save_tensors_streamed", killed)
    assert main([*args, "--force"]) == 2 and "interrupted" in _err(capsys)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # the new bundle is made beside it
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # and its temp folder removed
    check_bundle(out)
    monkeypatch.setattr(build, "save_tensors_streamed", real)
    assert main([*args, "--diffusion-steps", "4"]) == 0  # the rerun finishes from the work folder
    assert check_bundle(out)["training"]["diffusion_steps"] == 4


def test_a_work_folder_and_a_bundle_are_tied_to_their_data(faces, tmp_path, capsys):
    other = tmp_path / "other-faces"
    build_faces(other, n=48, size=16, seed=4)
    out, work = tmp_path / "b", tmp_path / "w"
    assert main(["build", "--data", str(faces), "--out", str(out), "--work", str(work), "--channels", "3", *TINY]) == 0
    before = (out / "manifest.json").read_bytes()
    assert main(["build", "--data", str(other), "--out", str(tmp_path / "b2"), "--work", str(work), "--channels", "3",
                 *TINY]) == 2  # its model, scores and classifier were made from the first faces
    assert "holds the intermediate files of other data (48 images from" in _err(capsys)
    assert not (tmp_path / "b2").exists()
    assert main(["build", "--data", str(other), "--out", str(tmp_path / "b2"), "--work", str(work), "--channels", "3",
                 "--force", *TINY]) == 0  # re-claimed: the model is kept, the score and classifier redone
    err = capsys.readouterr().err
    assert "--force: --work" in err and "4/6 minority score" in err and "5/6 minority classifier" in err
    assert "2/6 diffusion model: 3 steps" not in err
    args = ["build", "--data", str(other), "--out", str(out), "--work", str(tmp_path / "w2"), "--channels", "3", *TINY]
    assert main(args) == 2  # same bundle name, other data
    assert "already holds the bundle 'b', built from other data (48 images of 'data')" in _err(capsys)
    assert (out / "manifest.json").read_bytes() == before
    assert main([*args, "--force"]) == 0


def test_rescored_images_retrain_the_classifier_and_redo_the_sweep(faces, tmp_path, capsys):
    args = ["build", "--data", str(faces), "--out", str(tmp_path / "b"), "--channels", "3", "--truth", "rarity", *TINY]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--diffusion-steps", "4"]) == 0  # a longer-trained model: new scores, new labels
    err = capsys.readouterr().err
    assert "sweeping again" in err and "rescoring" in err and "5/6 minority classifier" in err
    from core.bundles.build import fingerprint

    clf = json.loads((tmp_path / "b" / "classifier.json").read_text())
    assert clf["scores"] == fingerprint(np.load(tmp_path / "b.work" / "scores.npy"))


def test_settings_that_cannot_work_are_refused_before_any_work(faces, tmp_path, capsys):
    base = ["build", "--data", str(faces), "--channels", "3", *TINY]
    out = tmp_path / "o"
    assert main([*base, "--out", str(out), "--work", str(out / "work")]) == 2
    assert "lies inside --out" in _err(capsys)
    assert main([*base, "--out", str(out), "--size", "15"]) == 2
    assert "--size 15 must be a multiple of 2 for --widths 8,16" in _err(capsys)
    assert main([*base, "--out", str(out), "--score-t", "5000"]) == 2
    assert "--score-t" in _err(capsys)
    data = tmp_path / "flat"
    build_faces(data, n=48, size=16, seed=3)
    meta = (data / "metadata.csv").read_text().splitlines()
    (data / "metadata.csv").write_text("\n".join([meta[0] + ",grade"] + [r + ",3" for r in meta[1:]]) + "\n")
    assert main(["build", "--data", str(data), "--out", str(out), "--truth", "grade", *TINY]) == 2
    assert "every image has the same value" in _err(capsys)
    assert not out.exists() and not Path(f"{out}.work").exists()


def test_the_sweep_ranks_only_images_with_a_truth_value(colour_bundle):
    from core.bundles.build import sweep_rows

    b = load_bundle(colour_bundle)
    images = torch.from_numpy(b.real.images).permute(0, 3, 1, 2).contiguous()
    truth = np.full(len(images), np.nan)
    truth[::4] = np.arange(len(truth[::4]), dtype=float)  # 12 of 48 known
    sub, rows = sweep_rows(b.model, images, truth, ("l2",), (0.5,), n=16, seed=0)
    assert len(sub) == 12 and np.isfinite(truth[sub]).all() and rows[0]["spearman"] is not None


def test_packed_real_images_round_trip_and_refuse_bad_streams():
    import zlib

    import torch

    from core.bundles.bundle import pack_images, unpack_images
    from core.errors import CheckpointError

    imgs = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    t = pack_images(imgs)
    assert np.array_equal(unpack_images(t, "x"), imgs) and np.array_equal(unpack_images({"images": torch.from_numpy(imgs)}, "x"), imgs)
    bomb = np.frombuffer(zlib.compress(b"\0" * (10 * imgs.size)), np.uint8).copy()  # inflates past the promised shape
    with pytest.raises(CheckpointError, match="more than images_shape"):
        unpack_images({"images_deflate": torch.from_numpy(bomb), "images_shape": t["images_shape"]}, "x")
    with pytest.raises(CheckpointError, match="less than"):
        unpack_images({"images_deflate": t["images_deflate"], "images_shape": torch.tensor([6, 8, 8, 3])}, "x")
    with pytest.raises(CheckpointError, match="damaged"):
        unpack_images({"images_deflate": torch.from_numpy(np.frombuffer(b"garbage!" * 4, np.uint8).copy()),
                       "images_shape": t["images_shape"]}, "x")
    with pytest.raises(CheckpointError, match="is not"):
        unpack_images({"images_deflate": t["images_deflate"], "images_shape": torch.tensor([5, 8, 8, 2])}, "x")
