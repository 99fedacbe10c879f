"""Issue 18.1: nearest real neighbours and the near-copy rule."""
import csv
import io
import json

import numpy as np
import pytest

from core.cli import main
from core.evaluation.neighbours import find_neighbours, near_copy_threshold, nearest


def _real(n=60, size=16, seed=0):
    rng = np.random.default_rng(seed)
    # smooth, distinct images: random low-frequency patterns, so a one-pixel shift stays closest to its source
    base = rng.normal(size=(n, 1, 4, 4))
    up = np.kron(base, np.ones((1, 1, size // 4, size // 4)))
    img = (np.clip(up * 50 + 128, 0, 255)).astype(np.uint8).transpose(0, 2, 3, 1)
    return img


def _npz(path, images):
    buf = io.BytesIO()
    np.savez(buf, images=images)
    path.write_bytes(buf.getvalue())


def test_blocked_nearest_equals_brute_force():
    rng = np.random.default_rng(1)
    real, gen = rng.normal(size=(300, 8)), rng.normal(size=(70, 8))
    idx, dist = nearest(real, gen, 4, chunk=16)
    full = np.sqrt(((gen[:, None] - real[None]) ** 2).sum(-1))
    np.testing.assert_array_equal(idx, np.argsort(full, axis=1, kind="stable")[:, :4])
    np.testing.assert_allclose(dist, np.sort(full, axis=1)[:, :4], rtol=1e-9, atol=1e-9)
    loo = np.sort(np.sqrt(((real[:, None] - real[None]) ** 2).sum(-1)) + np.eye(300) * 1e9, axis=1)[:, 0]
    assert near_copy_threshold(real) == pytest.approx(np.percentile(loo, 1.0))


def test_an_exact_copy_is_found_at_distance_zero_and_flagged():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(200, 16))
    gen = np.concatenate([rng.normal(size=(5, 16)), real[[17]]])
    nb = find_neighbours(real, gen, k=3)
    assert nb.indices[5, 0] == 17 and nb.distances[5, 0] == pytest.approx(0, abs=1e-6)
    assert nb.near_copy.tolist() == [False] * 5 + [True] and nb.near_copy_rate == pytest.approx(1 / 6)


def test_duplicate_real_images_do_not_switch_the_near_copy_rule_off():
    """Issue 24.7: with 2 % of the real images duplicated, the leave-one-out 1st percentile over all rows is 0
    (as the rule was), so a copy at distance 0 was not flagged. Counting each distinct image once keeps the
    threshold at that of the distinct set, and the copy is flagged."""
    rng = np.random.default_rng(3)
    distinct = rng.normal(size=(500, 16))
    real = np.concatenate([distinct, distinct[:10]])  # 10 of 510 rows are exact duplicates (2 %)
    loo_all = np.sort(np.sqrt(((real[:, None] - real[None]) ** 2).sum(-1)) + np.eye(len(real)) * 1e9, axis=1)[:, 0]
    assert np.percentile(loo_all, 1.0) == pytest.approx(0, abs=1e-6)  # the failure the issue reports
    th = near_copy_threshold(real)
    assert th == pytest.approx(near_copy_threshold(distinct)) and th > 0.5 * np.median(loo_all)
    gen = np.concatenate([rng.normal(size=(4, 16)), real[[3, 200]]])  # a duplicated and a plain real row
    nb = find_neighbours(real, gen, k=2)
    assert nb.near_copy.tolist() == [False] * 4 + [True, True], (nb.distances[:, 0], th)
    with pytest.raises(ValueError, match="2 distinct real images"):
        near_copy_threshold(np.ones((5, 3)))


@pytest.mark.parametrize("features", ["pixels", "resnet50-random"])
def test_cli_finds_copies_and_shifted_copies(tmp_path, capsys, features):
    """A copy of a real image inside a generated set is found at distance 0 and flagged; a copy shifted by one
    pixel finds that real image as its nearest neighbour. CSV, sheets and summary are written."""
    real = _real()
    from PIL import Image

    folder = tmp_path / "real"
    folder.mkdir()
    for i, im in enumerate(real):
        Image.fromarray(im[..., 0]).save(folder / f"{i:03d}.png")
    shifted = np.roll(real[23], 1, axis=1)
    other = _real(n=3, seed=9)
    gen = np.concatenate([real[[7]], shifted[None], other])
    _npz(tmp_path / "gen.npz", gen)
    out = tmp_path / "nb"
    args = ["neighbours", "--real", str(folder), "--generated", str(tmp_path / "gen.npz"), "--k", "3",
            "--out", str(out), "--features", features, "--rows", "4", "--sheets", "2"]
    if features == "resnet50-random":
        args += ["--image-size", "64"]
    assert main(args) == 0, capsys.readouterr().err
    rows = list(csv.DictReader(open(out / "neighbours.csv")))
    first = {int(r["index"]): r for r in rows if r["rank"] == "1"}
    assert first[0]["real_path"] == "007.png" and float(first[0]["distance"]) == pytest.approx(0, abs=1e-4)
    assert first[0]["near_copy"] == "1"
    assert first[1]["real_path"] == "023.png"
    assert len(rows) == 5 * 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sets"]["gen"]["near_copies"] >= 1 and summary["sets"]["gen"]["n"] == 5
    assert (out / "neighbours.png").is_file() and (out / "neighbours_gen_2.png").is_file()
    assert summary["threshold"] > 0


def test_cli_neighbours_bad_input_is_one_line(tmp_path, capsys):
    _npz(tmp_path / "r.npz", _real(n=10))
    _npz(tmp_path / "g.npz", _real(n=2, seed=3))
    for extra, msg in ((["--k", "20"], "--k must be at most 9"), (["--k", "0"], "--k must be >= 1"),
                       (["--rows", "40"], "--rows must be in [1, 32]"),
                       (["--features", "classifier"], "needs a bundle")):
        assert main(["neighbours", "--real", str(tmp_path / "r.npz"), "--generated", str(tmp_path / "g.npz"),
                     "--features", "pixels", "--out", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
    assert not (tmp_path / "o").exists()
