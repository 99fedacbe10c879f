"""Issue 24.1: a bundle from a stranger cannot reach outside itself. Each tampered case of the outside probe
(shared/probe-report.md: symlinks out of the bundle, manifest values out of range or of the wrong type) is
refused with one line naming the file or key, before anything is opened or allocated, from the library, the
command line and the app's entry."""
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from core.bundles.bundle import check_bundle, load_bundle, load_real, pack_images
from core.cli import main
from core.errors import CheckpointError
from core.nets.checkpoint import load_tensors, save_tensors

ROOT = Path(__file__).resolve().parent.parent
MRI = ROOT / "assets" / "mri-atrophy"
OUTSIDE_TEXT = "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"


@pytest.fixture
def outside(tmp_path):
    """A file outside the bundle, shaped like /etc/passwd (the probe's target), made here so no test depends on
    the machine's own files."""
    f = tmp_path / "outside" / "passwd"
    f.parent.mkdir()
    f.write_text(OUTSIDE_TEXT)
    return f


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def bundle(tmp_path):
    b = tmp_path / "b"
    shutil.copytree(MRI, b)
    return b


def _manifest(b: Path) -> dict:
    return json.loads((b / "manifest.json").read_text())


def _write_manifest(b: Path, m: dict) -> None:
    (b / "manifest.json").write_text(json.dumps(m))  # json writes NaN as the NaN literal, as a hostile file may


def _fix_sha(b: Path, name: str) -> None:
    """Make the manifest agree with the file as it is now (the probe's 'sha fixed' cases)."""
    m = _manifest(b)
    m["files"][name] = _sha(b / name)
    _write_manifest(b, m)


def _refused(b: Path, *needles: str) -> str:
    with pytest.raises(CheckpointError) as e:
        check_bundle(b)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    return msg


def test_the_shipped_bundles_pass_every_check():
    for b in (MRI, ROOT / "assets" / "faces"):
        m = check_bundle(b)
        assert load_real(b, m).images.shape[0] == m["dataset"]["n"]


@pytest.mark.parametrize("name", ["real.csv", "model.json", "classifier.json"])
def test_a_file_that_is_a_symlink_out_of_the_bundle_is_refused_even_with_its_sha(bundle, name, outside):
    (bundle / name).unlink()
    (bundle / name).symlink_to(outside)
    _fix_sha(bundle, name)
    _refused(bundle, name, "symlink")


def test_a_symlink_to_the_same_file_in_another_bundle_is_refused(bundle, tmp_path):
    (bundle / "model.safetensors").unlink()
    (bundle / "model.safetensors").symlink_to(MRI / "model.safetensors")  # same bytes, same sha
    _refused(bundle, "model.safetensors", "symlink")


def test_the_manifest_itself_as_a_symlink_is_refused(bundle, tmp_path):
    (tmp_path / "m.json").write_text((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").unlink()
    (bundle / "manifest.json").symlink_to(tmp_path / "m.json")
    _refused(bundle, "manifest.json", "symlink")


@pytest.mark.parametrize("entry", ["../real.csv", "/etc/passwd", "sub/real.csv", "..", "manifest.json"])
def test_a_files_entry_that_is_a_path_is_refused_by_name(bundle, entry):
    m = _manifest(bundle)
    m["files"][entry] = "0" * 64
    _write_manifest(bundle, m)
    _refused(bundle, "'files'", repr(entry)[:20])


def test_a_pending_weights_file_in_a_bundle_is_refused(bundle):
    (bundle / "model.pending.safetensors").write_bytes((bundle / "model.safetensors").read_bytes())
    _refused(bundle, "model.pending.safetensors")


BAD_VALUES = [
    ("score.draws", 1e9, "an integer in [1, 100]"),
    ("score.draws", 10 ** 9, "an integer in [1, 100]"),
    ("score.draws", 0, "an integer in [1, 100]"),
    ("score.draws", True, "an integer"),
    ("score.t", 1000, "an integer in [0, 999]"),
    ("score.t", "600", "an integer"),
    ("score.distance", "rm -rf", "one of"),
    ("score.seed", -1, "an integer"),
    ("score.clip", "yes", "true or false"),
    ("num_classes", 1, "an integer in [2, 1000]"),
    ("num_classes", 1000, "a list of num_classes = 1000 numbers"),
    ("num_classes", 4, "a list of num_classes = 4 numbers"),
    ("num_classes", "50", "an integer"),
    ("thresholds", ["a", None, "c"], "thresholds"),
    ("thresholds", "0.1,0.2", "a list of num_classes"),
    ("image_size", 0, "an integer in [8, 1024]"),
    ("image_size", 10 ** 6, "an integer in [8, 1024]"),
    ("channels", 2, "1 or 3"),
    ("T", -5, "an integer in [2, 100000]"),
    ("schedule", "quadratic", "one of linear, cosine"),
    ("name", "x\nroot:x:0:0", "printable text"),
    ("name", "A" * 100_000, "printable text"),
    ("dataset.truth", "root:x:0:0:root:/root:/bin/bash", "a column name"),
    ("dataset", [1, 2], "a JSON object"),
    ("config.slice_band", [0.9, 0.1], "[LO, HI]"),
    ("app.sampler", "../../x", "one of ddim, ddpm"),
]


def _set(m: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    node = m
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value


@pytest.mark.parametrize("key,value,want", BAD_VALUES, ids=[f"{k}={str(v)[:12]}" for k, v, _ in BAD_VALUES])
def test_a_manifest_value_out_of_range_or_of_the_wrong_type_is_one_line_naming_its_key(bundle, key, value, want):
    m = _manifest(bundle)
    _set(m, key, value)
    _write_manifest(bundle, m)
    key_named = "thresholds" if key == "num_classes" and want.startswith("a list") else key.split("[")[0]
    msg = _refused(bundle, want)
    assert key_named in msg and len(msg) < 400, msg


@pytest.mark.parametrize("how", ["nan", "inf", "decreasing"])
def test_thresholds_must_be_finite_and_never_decrease(bundle, how):
    m = _manifest(bundle)
    th = m["thresholds"]
    if how == "decreasing":
        th[10], th[11] = th[11], th[10]
    else:
        th[3] = math.nan if how == "nan" else math.inf
    _write_manifest(bundle, m)
    _refused(bundle, "thresholds[", "finite" if how != "decreasing" else "never decrease")


def test_the_manifests_l_must_be_the_classifiers(bundle):
    """An L that agrees with the thresholds but not with the shipped classifier (50 outputs) is caught at load."""
    m = _manifest(bundle)
    m["num_classes"] = 4
    m["thresholds"] = m["thresholds"][:4]
    _write_manifest(bundle, m)
    check_bundle(bundle)  # self-consistent manifest...
    with pytest.raises(CheckpointError, match="'num_classes' is 4 but the bundle's classifier has 50"):
        load_bundle(bundle)


def _retensor(b: Path, **changes) -> None:
    t = load_tensors(b / "real.safetensors")
    t.update(changes)
    t = {k: v for k, v in t.items() if v is not None}
    save_tensors(b / "real.safetensors", t)
    _fix_sha(b, "real.safetensors")


def test_real_data_of_the_wrong_shape_or_range_is_refused(bundle):
    t = load_tensors(bundle / "real.safetensors")
    n = t["score"].shape[0]
    cases = [
        ({"label": torch.full((n,), 60, dtype=torch.int64)}, "'label' must hold integers in [0, 50)"),
        ({"coords": torch.zeros(n, 3)}, "'coords' has shape"),
        ({"score": torch.full((n,), float("nan"))}, "'score' must hold finite floats"),
        ({"images_shape": torch.tensor([n, 64, 64, 1])}, "does not match the manifest's"),
        ({"images_shape": torch.tensor([10 ** 7, 32, 32, 1])}, "promises 9.5 GiB of images (limit 4 GiB)"),
        ({"images_shape": torch.tensor([n + 1, 32, 32, 1])}, "holds less than images_shape"),
    ]
    packed = pack_images(t["images"].numpy()) if "images" in t else {}  # the deflated form, as build writes it
    for change, message in cases:
        b = bundle.parent / f"c{len(message)}"
        shutil.copytree(bundle, b)
        if "images_shape" in change:
            _retensor(b, images=None, **{**packed, **change})
        else:
            _retensor(b, **change)
        with pytest.raises(CheckpointError, match=None) as e:
            load_real(b)
        assert message in str(e.value), (change.keys(), str(e.value))


def test_score_bundle_reads_the_scores_alone_and_checks_them(bundle):
    """``score --bundle`` reads the real scores without the images (bundle.real_scores), with load_real's checks."""
    from core.bundles.bundle import real_scores

    t = load_tensors(bundle / "real.safetensors")
    n = t["score"].shape[0]
    assert np.array_equal(real_scores(bundle), load_real(bundle).score.astype(np.float64))
    for i, (change, message) in enumerate([({"score": torch.zeros(n + 1)}, "one finite float per image"),
                                           ({"score": torch.full((n,), float("inf"))}, "one finite float per image"),
                                           ({"score": torch.zeros(n, dtype=torch.int64)}, "one finite float per image"),
                                           ({"score": None}, "missing key 'score'")]):
        b = bundle.parent / f"s{i}"
        shutil.copytree(bundle, b)
        _retensor(b, **change)
        with pytest.raises(CheckpointError) as e:
            real_scores(b)
        assert message in str(e.value) and "not a valid" not in str(e.value), str(e.value)


def test_real_csv_text_is_checked_before_the_app_shows_it(bundle):
    lines = (bundle / "real.csv").read_text().splitlines()
    for i, (header, row, message) in enumerate([
        (lines[0].replace("severity", "root:x:0:0:root:/root:/bin/bash"), None, "header column"),
        (lines[0].replace("path", "file"), None, "no 'path' column"),
        (None, "../../etc/passwd", "row 2 path"),
        (None, "/etc/passwd", "row 2 path"),
    ]):
        b = bundle.parent / f"csv{i}"
        shutil.copytree(bundle, b)
        new = list(lines)
        if header:
            new[0] = header
        if row:
            new[1] = row + new[1][new[1].index(","):]
        (b / "real.csv").write_text("\n".join(new) + "\n")
        _fix_sha(b, "real.csv")
        with pytest.raises(CheckpointError) as e:
            load_real(b)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("command", ["sample", "score"])
def test_the_command_line_refuses_a_tampered_bundle_in_one_line(bundle, tmp_path, capsys, command, outside):
    (bundle / "real.csv").unlink()
    (bundle / "real.csv").symlink_to(outside)
    _fix_sha(bundle, "real.csv")
    data = tmp_path / "d"
    data.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((32, 32), np.uint8)).save(data / "a.png")
    args = {"sample": ["sample", "--bundle", str(bundle), "--n", "1", "--steps", "2", "--out", str(tmp_path / "s.npz")],
            "score": ["score", "--bundle", str(bundle), "--data", str(data), "--out", str(tmp_path / "s.csv")]}[command]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "real.csv is a symlink" in err[0] and "root:" not in err[0], err
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "s.csv").exists()


def test_score_bundle_refuses_a_huge_draws_before_any_allocation(bundle, tmp_path, capsys):
    m = _manifest(bundle)
    m["score"]["draws"] = 10 ** 9
    _write_manifest(bundle, m)
    assert main(["score", "--bundle", str(bundle), "--data", str(tmp_path), "--out", str(tmp_path / "s.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'score.draws' must be an integer in [1, 100]" in err[0], err


def test_the_app_never_serves_a_bundle_that_reaches_outside(bundle, monkeypatch, capsys, outside):
    """app.py with the symlinked bundle alone: exit 2, no server; beside a good bundle: skipped, and the page
    (the /config every visitor gets) carries nothing of /etc/passwd."""
    import importlib.util

    import gradio as gr

    from app import handlers as h

    (bundle / "real.csv").unlink()
    (bundle / "real.csv").symlink_to(outside)
    _fix_sha(bundle, "real.csv")
    spec = importlib.util.spec_from_file_location("app_entry", ROOT / "app.py")
    app_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app_module)
    seen = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: seen.update(demo=self))
    monkeypatch.setattr(h.Studio, "warm", lambda self: self)
    assert app_module.main(["--bundle", str(bundle)]) == 2
    assert "real.csv is a symlink" in capsys.readouterr().err and "demo" not in seen
    assert app_module.main(["--bundle", str(MRI), "--bundle", str(bundle)]) == 0
    assert "real.csv is a symlink" in capsys.readouterr().err
    first_line = OUTSIDE_TEXT.splitlines()[0]
    page = json.dumps(seen["demo"].config, default=str)
    assert first_line not in page and "root:x:0:0" not in page
    assert "was skipped" in page
    assert os.path.islink(bundle / "real.csv")  # nothing was changed in the stranger's folder
