"""Evaluation metrics (issue 4): closed forms, invariants, brute-force equality, bad input, the CLI report."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from core.cli import main
from core.errors import DataError, OfflineError
from core.evaluation.evaluate import EvalSettings, check_sets, evaluate_features
from core.evaluation.metrics import (Features, avg_knn, extract_features, fid, frechet_distance, knn_radii, lof,
                          make_extractor, precision_recall, rarity_score, top_unique)


def _brute_dist(a, b):
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


def test_fid_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 16))
    assert fid(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_matches_the_gaussian_formula():
    rng = np.random.default_rng(1)
    # diagonal covariances: FID = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = rng.uniform(0.5, 2.0, 6), rng.uniform(0.5, 2.0, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)
    # general covariances: against scipy's sqrtm
    from scipy.linalg import sqrtm

    m1, m2 = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(6), m2 @ m2.T + 0.1 * np.eye(6)
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(sqrtm(s1 @ s2)))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)


def test_fid_from_samples_converges_to_the_formula():
    rng = np.random.default_rng(2)
    x = rng.normal(0.0, 1.0, size=(20000, 3))
    y = rng.normal(0.5, 2.0, size=(20000, 3))
    want = 3 * 0.5 ** 2 + 3 * (1.0 - 2.0) ** 2  # 3.75
    assert fid(x, y) == pytest.approx(want, rel=0.03)


def test_precision_recall_identical_and_shifted():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 8))
    assert precision_recall(x, x.copy(), k=5) == (1.0, 1.0)
    p_near, r_near = precision_recall(x, x + 1.0, k=5)
    p_far, r_far = precision_recall(x, x + 10.0, k=5)
    assert p_far < p_near < 1.0 and r_far < r_near < 1.0
    assert p_far == 0.0 and r_far == 0.0


def test_avgknn_equals_brute_force():
    rng = np.random.default_rng(4)
    real, gen = rng.normal(size=(120, 5)), rng.normal(size=(30, 5)) * 1.5
    real_s, gen_s = avg_knn(real, gen, k=5)
    d = _brute_dist(gen, real)
    np.testing.assert_allclose(gen_s, np.sort(d, axis=1)[:, :5].mean(1), rtol=1e-9)
    dr = _brute_dist(real, real)
    np.fill_diagonal(dr, np.inf)  # the real scores exclude the sample itself
    np.testing.assert_allclose(real_s, np.sort(dr, axis=1)[:, :5].mean(1), rtol=1e-9)


def test_lof_near_one_in_a_uniform_cloud_and_large_for_an_isolated_point():
    rng = np.random.default_rng(5)
    real = rng.uniform(0, 1, size=(2000, 2))
    inside = rng.uniform(0.3, 0.7, size=(50, 2))
    _, s_in = lof(real, inside, k=20)
    _, s_out = lof(real, np.array([[5.0, 5.0]]), k=20)
    assert 0.9 < np.median(s_in) < 1.1
    assert s_out[0] > 10


def test_rarity_exact_on_a_hand_built_example():
    real = np.array([[0.0], [1.0], [3.0], [10.0]])  # k=1 radii: 1, 1, 2, 7
    gen = np.array([[0.5], [4.5], [12.0], [30.0]])
    r = rarity_score(real, gen, k=1)
    np.testing.assert_array_equal(r.scores[:3], [1.0, 2.0, 7.0])  # smallest radius among the balls containing it
    assert np.isnan(r.scores[3]) and r.outside == 1
    assert r.mean == pytest.approx(10.0 / 3)
    assert rarity_score(real, gen[:3], k=1).outside == 0


def test_chunked_results_equal_one_block():
    rng = np.random.default_rng(6)
    real, gen = rng.normal(size=(700, 6)), rng.normal(size=(300, 6)) * 1.3
    np.testing.assert_allclose(knn_radii(real, 5, chunk=37), knn_radii(real, 5, chunk=10_000))
    a, b = rarity_score(real, gen, 5, chunk=41), rarity_score(real, gen, 5, chunk=10_000)
    np.testing.assert_array_equal(np.isnan(a.scores), np.isnan(b.scores))
    np.testing.assert_allclose(a.scores[~np.isnan(a.scores)], b.scores[~np.isnan(b.scores)])
    assert precision_recall(real, gen, 5, chunk=53) == precision_recall(real, gen, 5, chunk=10_000)


def test_top_unique_fraction_count_and_all():
    s = np.array([0.1, 0.9, 0.5, 0.7, 0.3])
    assert top_unique(s, 0.4).tolist() == [1, 3]
    assert top_unique(s, 3).tolist() == [1, 3, 2]
    assert sorted(top_unique(s, 1.0).tolist()) == [0, 1, 2, 3, 4]
    for bad in (0, -1, 6, 2.5):
        with pytest.raises(ValueError, match="baseline-top"):
            top_unique(s, bad)


@pytest.mark.parametrize("fn", [lambda r, g: avg_knn(r, g), lambda r, g: lof(r, g), lambda r, g: rarity_score(r, g),
                                lambda r, g: precision_recall(r, g), lambda r, g: fid(r, g)])
def test_bad_feature_input_is_one_clear_error(fn):
    ok = np.random.default_rng(0).normal(size=(50, 4))
    with pytest.raises(DataError, match="empty"):
        fn(ok, np.zeros((0, 4)))
    nan = ok.copy()
    nan[3, 1] = np.nan
    with pytest.raises(DataError, match="NaN"):
        fn(ok, nan)
    with pytest.raises(DataError, match="fewer|at least"):
        fn(ok[:1], ok)


def test_mismatched_image_sizes_and_types_are_refused():
    real = np.zeros((10, 16, 16, 1), np.uint8)
    with pytest.raises(DataError, match="one size"):
        check_sets(real, {"a": np.zeros((10, 8, 8, 1), np.uint8)})
    with pytest.raises(DataError, match="uint8"):
        check_sets(real, {"a": np.zeros((10, 16, 16, 1), np.float32)})
    with pytest.raises(DataError, match="empty"):
        check_sets(real, {"a": np.zeros((0, 16, 16, 1), np.uint8)})


def test_features_are_seeded_finite_and_shaped():
    imgs = np.random.default_rng(0).integers(0, 256, size=(6, 32, 32, 1), dtype=np.uint8)
    a = extract_features(make_extractor("resnet50-random", seed=0, image_size=64), imgs, batch_size=4)
    b = extract_features(make_extractor("resnet50-random", seed=0, image_size=64), imgs, batch_size=6)
    c = extract_features(make_extractor("resnet50-random", seed=1, image_size=64), imgs)
    assert a.pooled.shape == (6, 2048) and a.spatial.shape == (6, 7 * 4 * 4)
    np.testing.assert_allclose(a.pooled, b.pooled, rtol=1e-4, atol=1e-5)
    assert not np.allclose(a.pooled, c.pooled)
    assert np.isfinite(a.pooled).all() and a.pooled.std() > 0


def test_random_inception_features_stay_finite_in_scale():
    """inception-random is an offline stand-in for FID: with Inception's own init its activations grew ~4x per
    layer (pool3 ~1e9, FIDs of 1e19); with a variance-preserving init they stay of order one."""
    imgs = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 1), dtype=np.uint8)
    f = extract_features(make_extractor("inception-random", image_size=96), imgs)
    assert 1e-3 < float(np.abs(f.pooled).mean()) < 10 and 1e-3 < float(np.abs(f.spatial).mean()) < 10


def test_pretrained_features_offline_name_the_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for name in ("resnet50", "inception"):
        with pytest.raises(OfflineError, match="resnet50-random"):
            make_extractor(name)
    with pytest.raises(ValueError, match="allowed: resnet50-random"):
        make_extractor("vgg")


def _trunk(net, h):
    for n in ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
              "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"]:
        h = getattr(net, n)(h)
    return h


def test_inception_input_matches_torchvisions_own_transform():
    """Inception's ported weights expect (x - 0.5) / 0.5: our layer-by-layer path must equal torchvision's
    forward with transform_input=True (which takes ImageNet-normalised input and converts it)."""
    from core.evaluation.metrics import IMAGENET_MEAN, IMAGENET_STD, _inception

    ex = _inception(96, "cpu", pretrained=False)
    net = ex.fn.__closure__[[c.cell_contents.__class__.__name__ for c in ex.fn.__closure__].index("Inception3")].cell_contents
    net.transform_input = True
    x = torch.rand(2, 3, 96, 96)
    pooled, _ = ex.fn(x * 2 - 1)
    z = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ours, theirs = net.fc(pooled), net(z)
    scale = float(theirs.abs().max())  # random weights give huge logits: compare relative to their size
    assert float((ours - theirs).abs().max()) < 1e-3 * scale
    with torch.no_grad():  # the ImageNet normalisation would be far off: the check can fail
        wrong = net.fc(torch.flatten(net.avgpool(net.Mixed_7c(net.Mixed_7b(net.Mixed_7a(_trunk(net, z))))), 1))
    assert float((wrong - theirs).abs().max()) > 1e-2 * scale


def test_classifier_features():
    from core.nets.models import ClassifierConfig, LoadedClassifier, NoiseConditionedClassifier

    net = NoiseConditionedClassifier(ClassifierConfig(image_size=16, channels=1, num_outputs=4, base_channels=8))
    ex = make_extractor("classifier", classifier=LoadedClassifier(net, [0.0, 1.0, 2.0, 3.0]))
    f = extract_features(ex, np.full((3, 16, 16, 1), 128, np.uint8))
    assert f.pooled.shape == (3, net.feature_dim) and np.isfinite(f.spatial).all()
    with pytest.raises(ValueError, match="needs a classifier"):
        make_extractor("classifier")


def test_report_ranks_a_shifted_set_rarer():
    rng = np.random.default_rng(7)
    real = rng.normal(size=(300, 8))
    common = Features(rng.normal(size=(80, 8)), rng.normal(size=(80, 4)))
    rare = Features(rng.normal(size=(80, 8)) * 1.8, rng.normal(size=(80, 4)) * 1.8)
    rep = evaluate_features(Features(real, rng.normal(size=(300, 4))), {"common": common, "rare": rare},
                            EvalSettings(baseline_top=1.0))
    c, r = rep.sets
    assert r.avgknn_mean > c.avgknn_mean and r.lof_mean > c.lof_mean
    assert c.fid < r.fid
    assert rep.baseline_n == 300


def _write_npz(path, images):
    buf = io.BytesIO()
    np.savez(buf, images=images)
    path.write_bytes(buf.getvalue())


def test_cli_evaluate_writes_json_markdown_and_plot(tmp_path, capsys):
    rng = np.random.default_rng(8)
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    real = rng.integers(0, 256, size=(40, 16, 16, 1), dtype=np.uint8)
    for i, im in enumerate(real):
        Image.fromarray(im[..., 0]).save(real_dir / f"{i:03d}.png")
    _write_npz(tmp_path / "same.npz", real)
    _write_npz(tmp_path / "noise.npz", rng.integers(0, 256, size=(30, 16, 16, 1), dtype=np.uint8))
    rc = main(["evaluate", "--real", str(real_dir), "--generated", str(tmp_path / "same.npz"),
               str(tmp_path / "noise.npz"), "--out", str(tmp_path / "rep"), "--image-size", "32",
               "--baseline-top", "1.0"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    same = next(s for s in rep["sets"] if s["name"] == "same")
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["fid"] == pytest.approx(0, abs=1e-3)
    assert len(same["per_sample"]["avgknn"]) == 40 and rep["settings"]["features"] == "resnet50-random"
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| same | 40 |" in md and "| noise | 30 |" in md
    noise = next(s for s in rep["sets"] if s["name"] == "noise")
    assert same["near_copy_rate"] == 1.0 and noise["near_copy_rate"] < 0.5  # issue 18: copies of real data flagged
    assert "near-copy |" in md and "| 100.0% |" in md
    png = Image.open(tmp_path / "rep" / "density.png")
    assert png.size[0] > 800


def test_cli_evaluate_bad_input_is_one_line(tmp_path, capsys):
    _write_npz(tmp_path / "a.npz", np.zeros((20, 16, 16, 1), np.uint8))
    _write_npz(tmp_path / "b.npz", np.zeros((20, 8, 8, 1), np.uint8))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    cases = [
        (["--real", str(tmp_path / "a.npz"), "--generated", str(tmp_path / "b.npz")], "one size"),
        (["--real", str(tmp_path / "a.npz"), "--generated", str(tmp_path / "junk.npz")], "readable"),
        (["--real", str(tmp_path / "a.npz"), "--generated", str(tmp_path / "missing.npz")], "no such"),
        (["--real", str(tmp_path / "a.npz"), "--generated", str(tmp_path / "a.npz"), "--features", "vgg"], "allowed"),
    ]
    for args, msg in cases:
        capsys.readouterr()
        assert main(["evaluate", *args, "--out", str(tmp_path / "rep")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
    assert not (tmp_path / "rep").exists()


def test_sfid_map_is_tf_mixed_6_conv():
    """Issue 15.5: sFID uses the first 7 channels of TF's mixed_6/conv = Mixed_6d.branch1x1 (192 x 17 x 17 at
    299 px), computed here layer by layer from torchvision's own modules (not by the extractor's hook)."""
    from core.evaluation.metrics import SFID_LAYER, _imagenet_input, _inception

    ex = _inception(299, "cpu", pretrained=False)
    net = ex.fn.__closure__[[c.cell_contents.__class__.__name__ for c in ex.fn.__closure__].index("Inception3")].cell_contents
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    _, spatial = ex.fn(x)
    with torch.no_grad():
        h = _imagenet_input(x, 299, inception=True)
        for n in ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                  "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c"]:
            h = getattr(net, n)(h)
        mixed_6_conv = net.Mixed_6d.branch1x1(h)  # the 1x1 branch of the block after Mixed_6c
    assert SFID_LAYER == "Mixed_6d.branch1x1" and mixed_6_conv.shape == (2, 192, 17, 17)
    torch.testing.assert_close(spatial, mixed_6_conv[:, :7].flatten(1))
    assert spatial.shape == (2, 7 * 17 * 17)


def test_inception_fid_loads_only_from_the_cache(tmp_path, monkeypatch):
    """--features inception-fid: pytorch-fid's TF-compatible network from a file in the torch hub cache (a
    weights-only load), never a download; absent, one line naming the file. The network equals what
    pytorch-fid's own fid_inception_v3() builds: the file is made from that network (a strict load into ours
    checks every key and shape) and both give the same pool3 features."""
    from pytorch_fid import inception as pf

    from core.evaluation.metrics import FID_INCEPTION_FILES

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(OfflineError, match=FID_INCEPTION_FILES[0].replace(".", "\\.")):
        make_extractor("inception-fid")
    with monkeypatch.context() as m:  # pytorch-fid's builder, its download and weight loading switched off
        m.setattr(pf, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(torch.nn.Module, "load_state_dict", lambda self, *a, **k: None)
        ref = pf.fid_inception_v3()
    torch.manual_seed(0)
    sd = {k: (torch.rand_like(v) + 0.5 if "running_var" in k else torch.randn_like(v) * 0.05)
          if v.is_floating_point() else v for k, v in ref.state_dict().items()}
    ref.load_state_dict(sd)
    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.save(sd, ckpt / FID_INCEPTION_FILES[1])  # torch-fidelity's name of the same file
    ex = make_extractor("inception-fid")
    f = extract_features(ex, np.random.default_rng(0).integers(0, 256, (3, 16, 16, 1), dtype=np.uint8))
    assert f.pooled.shape == (3, 2048) and f.spatial.shape == (3, 2023) and "pytorch-fid" in ex.info["weights"]
    ref.eval()
    with torch.no_grad():
        x = torch.rand(2, 3, 299, 299)
        ours, _ = ex.fn(x * 2 - 1)
        h = x * 2 - 1
        for n in ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                  "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                  "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"]:
            h = getattr(ref, n)(h)
    torch.testing.assert_close(ours, torch.flatten(h, 1), rtol=1e-4, atol=1e-4)


def test_cli_evaluate_paper_protocol_uses_two_spaces(tmp_path, capsys, monkeypatch):
    """--protocol paper: density and the baseline in ResNet-50 (random init for grey data), FID, sFID and
    precision/recall in Inception-v3; offline without Inception weights one line names them."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rng = np.random.default_rng(3)
    real = rng.integers(0, 256, size=(30, 16, 16, 1), dtype=np.uint8)
    _write_npz(tmp_path / "real.npz", real)
    _write_npz(tmp_path / "gen.npz", rng.integers(0, 256, size=(24, 16, 16, 1), dtype=np.uint8))
    base = ["evaluate", "--real", str(tmp_path / "real.npz"), "--generated", str(tmp_path / "gen.npz"),
            "--image-size", "96", "--baseline-top", "1.0"]
    assert main(base + ["--protocol", "paper", "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pt_inception-2015-12-05-6726825d.pth" in err[0] and "inception-random" in err[0]
    assert not (tmp_path / "no").exists()
    assert main(base + ["--protocol", "paper", "--features", "resnet50-random", "--out", str(tmp_path / "no")]) == 2
    assert "drop --features" in capsys.readouterr().err
    assert main(base + ["--protocol", "paper", "--quality-features", "inception-random", "--out", str(tmp_path / "p")]) == 0
    assert main(base + ["--features", "resnet50-random", "--out", str(tmp_path / "s")]) == 0
    p = json.loads((tmp_path / "p" / "report.json").read_text())
    s = json.loads((tmp_path / "s" / "report.json").read_text())
    assert p["settings"]["features"] == "resnet50-random" and p["settings"]["quality_features"] == "inception-random"
    assert p["settings"]["protocol"] == "paper" and "Mixed_6d" in p["settings"]["quality_extractor"]["spatial"]
    # the same density space: the same AvgkNN; quality in another space: another FID
    assert p["sets"][0]["avgknn_mean"] == pytest.approx(s["sets"][0]["avgknn_mean"], rel=1e-4)
    assert p["sets"][0]["fid"] != pytest.approx(s["sets"][0]["fid"], rel=1e-2)
    assert "(the paper's protocol)" in (tmp_path / "p" / "report.md").read_text()


def test_inception_spaces_refuse_inputs_below_75_pixels_in_one_line():
    """Inception-v3 cannot take inputs under 75 px (its stem shrinks them to nothing): a ValueError naming the
    flag, not a RuntimeError from inside the network."""
    from core.evaluation.metrics import make_extractor

    for name in ("inception-random", "inception", "inception-fid"):
        with pytest.raises(ValueError, match="--image-size must be at least 75"):
            make_extractor(name, image_size=64)
