"""Issue 16: the failures and weak spots an outside probe found, over every command that takes the same kind
of flag or output, and cheap guards of the headline claims. Each bad input: exit code 2, one `error:` line
naming the flag or file, no traceback, and no output or partial file left."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from core.cli import build_parser, main
from core.cli.common import finite_float, seed_int

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / "assets" / "mri-atrophy"

# every command with the arguments it needs to parse; OUT is where its output goes (checked before any work)
COMMANDS = {
    "data mri-phantom": (["data", "mri-phantom", "--out", "OUT", "--n", "8", "--size", "16"], "--out", "dir"),
    "build-demo": (["build-demo", "--out", "OUT", "--n", "8"], "--out", "dir"),
    "data faces": (["data", "faces", "--out", "OUT", "--n", "4", "--size", "16"], "--out", "dir"),
    "build": (["build", "--data", "DATA", "--out", "OUT", "--classes", "2", "--diffusion-steps", "1", "--clf-steps", "1",
               "--draws", "1", "--map", "pca", "--size", "16"], "--out", "dir"),
    "train-diffusion": (["train-diffusion", "--data", "DATA", "--out", "OUT", "--size", "16", "--steps", "2"], "--out", "dir"),
    "score": (["score", "--model", "MODEL", "--data", "DATA", "--out", "OUT", "--distance", "l2"], "--out", "file"),
    "categorize": (["categorize", "--scores", "OUT", "--classes", "4"], "--scores", "file"),
    "train-classifier": (["train-classifier", "--model", "MODEL", "--data", "DATA", "--scores", "SCORES", "--out", "OUT",
                          "--steps", "2"], "--out", "dir"),
    "sample": (["sample", "--bundle", "BUNDLE", "--n", "1", "--steps", "2", "--out", "OUT"], "--out", "file"),
    "evaluate": (["evaluate", "--real", "BUNDLE", "--generated", "GEN", "--out", "OUT"], "--out", "dir"),
    "neighbours": (["neighbours", "--real", "BUNDLE", "--generated", "GEN", "--out", "OUT"], "--out", "dir"),
}


@pytest.fixture
def places(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    from PIL import Image

    for i in range(4):
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(data / f"{i}.png")
    gen = tmp_path / "gen.npz"
    np.savez(gen, images=np.zeros((8, 32, 32, 1), np.uint8))
    scores = tmp_path / "scores.csv"
    scores.write_text("path,score,label\n0.png,0.1,\n1.png,0.2,\n2.png,0.3,\n3.png,0.4,\n")
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    return {"DATA": str(data), "MODEL": str(BUNDLE), "BUNDLE": str(BUNDLE), "GEN": str(gen), "SCORES": str(scores),
            "blocker": blocker, "tmp": tmp_path}


def _args(name, places, out):
    args, flag, kind = COMMANDS[name]
    return [str(out) if a == "OUT" else places.get(a, a) for a in args], flag, kind


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


@pytest.mark.parametrize("name", list(COMMANDS))
@pytest.mark.parametrize("case", ["is-the-wrong-kind", "under-a-file", "not-writable"])
def test_unusable_output_is_refused_before_any_work(name, case, places, capsys, monkeypatch):
    """Issue 16.1: an --out that is an existing file (a folder for file outputs), that sits under a file, or
    whose folder cannot be written ends with one line naming the flag before any work; nothing is made."""
    tmp, blocker = places["tmp"], places["blocker"]
    _, flag, kind = COMMANDS[name]
    before = sorted(p.name for p in tmp.iterdir())
    if case == "is-the-wrong-kind":
        out = blocker if kind == "dir" else tmp / "data"
    elif case == "under-a-file":
        out = blocker / ("sub" if kind == "dir" else "x.out")
    else:
        out = tmp / "ro" / ("o" if kind == "dir" else "o.out")
        (tmp / "ro").mkdir()
        before = sorted(before + ["ro"])
        import tempfile

        real = tempfile.mkstemp

        def refuse(*a, **k):  # a read-only folder (root ignores chmod, so the refusal is simulated)
            if str(k.get("dir", "")).startswith(str(tmp / "ro")):
                raise PermissionError(13, "Permission denied")
            return real(*a, **k)

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    args, flag, _ = _args(name, places, out)
    if name == "categorize" and case == "not-writable":
        shutil.copy(places["SCORES"], tmp / "ro" / "o.out")
    t0 = time.perf_counter()
    assert main(args) == 2
    line = _one_error_line(capsys, flag)
    assert time.perf_counter() - t0 < 20, "refused after the work, not before"
    if case == "not-writable":
        assert "Permission denied" in line
    assert blocker.read_text() == "keep me"
    assert sorted(p.name for p in tmp.iterdir()) == before  # no output, no partial folder
    if case == "not-writable":
        assert sorted(p.name for p in (tmp / "ro").iterdir()) == (["o.out"] if name == "categorize" else [])


def _command_parsers():
    """(command words, its parser) for every command of ``python -m core``, read from the parser itself."""
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    out = []
    for name, p in sub.choices.items():
        nested = [a for a in p._actions if a.__class__.__name__ == "_SubParsersAction"]
        out += [([name, n], q) for n, q in nested[0].choices.items()] if nested else [([name], p)]
    return out


FLOAT_FLAGS = [(" ".join(words), a.option_strings[0]) for words, p in _command_parsers()
               for a in p._actions if a.type is finite_float]
SEED_COMMANDS = [" ".join(words) for words, p in _command_parsers() if any("--seed" in a.option_strings for a in p._actions)]


def test_every_float_flag_is_checked():
    """Every float flag of every command goes through finite_float (no plain float left), every --seed through
    seed_int."""
    plain = [f"{' '.join(w)} {a.option_strings}" for w, p in _command_parsers() for a in p._actions if a.type is float]
    seeds = [" ".join(w) for w, p in _command_parsers() for a in p._actions
             if "--seed" in a.option_strings and a.type is not seed_int]
    assert not plain and not seeds and len(FLOAT_FLAGS) >= 12, (plain, seeds)
    assert len(SEED_COMMANDS) >= 7


@pytest.mark.parametrize("words, flag", FLOAT_FLAGS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused(words, flag, value, places, capsys):
    """Issue 16.2: NaN and infinity in any float flag: one line naming the flag, before any work."""
    name = words if words in COMMANDS else words.split()[0]
    out = places["tmp"] / "out"
    args, _, _ = _args(name, places, out)
    assert main(args + [f"{flag}={value}"]) == 2
    _one_error_line(capsys, flag, "finite number")
    assert not out.exists()


def test_seeds_must_be_non_negative_and_leave_nothing(places, capsys):
    """Issue 16.5: data mri-phantom --seed -1 named its flag nowhere and left an empty folder."""
    for name in SEED_COMMANDS:
        out = places["tmp"] / "out"
        args, _, _ = _args(name, places, out)
        assert main(args + ["--seed=-1"]) == 2
        _one_error_line(capsys, "--seed", "seed (integer >= 0)")
        assert not out.exists()
    assert finite_float("2.5") == 2.5 and seed_int("7") == 7


def test_baseline_top_nan_names_its_flag(places, capsys):
    args, _, _ = _args("evaluate", places, places["tmp"] / "rep")
    assert main(args + ["--baseline-top", "nan"]) == 2
    _one_error_line(capsys, "--baseline-top")


def test_app_api_refuses_non_finite_numbers():
    from app import handlers as h
    from core.errors import MinorityError

    for kw in ({"scale": float("nan")}, {"scale": float("inf")}, {"gamma": float("nan")}):
        with pytest.raises(MinorityError, match="must be in"):
            h.GenerateRequest(**{"minority_class": 49, "scale": 1.0, **kw}).check(50)


def test_class_label_on_an_unconditional_model_is_refused(places, capsys):
    """Issue 16.4: --class-label was silently ignored on an unconditional model."""
    out = places["tmp"] / "x.npz"
    assert main(["sample", "--bundle", str(BUNDLE), "--n", "1", "--steps", "2", "--class-label", "5",
                 "--out", str(out)]) == 2
    _one_error_line(capsys, "--class-label 5", "class-conditional")
    assert not out.exists()


@pytest.mark.parametrize("words", [["score", "--model", "MODEL", "--data", "DATA", "--out", "OUT"],
                                   ["categorize", "--scores", "SCORES"],
                                   ["train-classifier", "--model", "MODEL", "--data", "DATA", "--scores", "SCORES",
                                    "--out", "OUT"]])
@pytest.mark.parametrize("classes", ["0", "1"])
def test_classes_rule_is_the_same_everywhere(words, classes, places, capsys):
    """Issue 16.4: score --classes 0 was accepted while train-classifier --classes 0 was refused."""
    out = places["tmp"] / "o"
    args = [str(out) if a == "OUT" else places.get(a, a) for a in words]
    assert main(args + ["--classes", classes]) == 2
    _one_error_line(capsys, "--classes must be >= 2")
    assert not out.exists()


def test_resume_without_saved_state_says_so(places, capsys):
    out = places["tmp"] / "run"
    assert main(["train-diffusion", "--data", places["DATA"], "--out", str(out), "--size", "16", "--steps", "1",
                 "--widths", "8,8", "--batch-size", "2", "--resume"]) == 0
    assert "--resume: no saved state" in capsys.readouterr().err


def test_error_line_starts_after_a_progress_bar(capsys):
    """Issue 16.6: an error printed while a bar was open shared the bar's line."""
    from core.cli.common import _bar, _fail

    bar = _bar(10, "work")
    bar.update(3)
    _fail("something went wrong")
    err = capsys.readouterr().err
    assert "work:" in err  # the bar was drawn
    assert "\nerror: something went wrong" in err


def test_stale_temp_files_of_a_killed_run_are_removed(places, capsys):
    """Issue 16.7: temp files from a killed run (atomic-write temps, pending weights the JSON does not name)
    are removed by a later run writing in the same folder; a pending file the JSON names (a save to roll
    forward) and fresh temps (a write in progress elsewhere) are kept."""
    from core.nets.checkpoint import save_weights_and_config

    run = places["tmp"] / "run"
    run.mkdir()
    save_weights_and_config(run, "model", {"w": torch.ones(2)}, {"kind": "x"})
    old = time.time() - 3600
    stale = [run / ".train_state.safetensors.ab12cd34.tmp", run / "model.pending.safetensors"]
    for f in stale:
        f.write_bytes(b"half written")
        os.utime(f, (old, old))
    fresh = run / ".scores.csv.zz99yy88.tmp"
    fresh.write_bytes(b"being written")
    other = run / "notes.tmp"
    other.write_text("not ours")
    assert main(["sample", "--bundle", str(BUNDLE), "--n", "1", "--steps", "2", "--out", str(run / "x.npz")]) == 0
    assert not any(f.exists() for f in stale)
    assert fresh.exists() and other.exists() and (run / "model.safetensors").exists() and (run / "x.npz").exists()


def test_manifest_must_list_every_file(tmp_path, capsys):
    """Issue 16.3: "files": {} skipped every sha256 check, so edited weights loaded."""
    from core.bundles.bundle import check_bundle
    from core.errors import CheckpointError

    for case in ("empty", "one-missing"):
        bad = tmp_path / case
        shutil.copytree(BUNDLE, bad)
        m = json.loads((bad / "manifest.json").read_text())
        if case == "empty":
            m["files"] = {}
        else:
            del m["files"]["model.safetensors"]
        (bad / "manifest.json").write_text(json.dumps(m))
        with open(bad / "model.safetensors", "r+b") as f:  # and the weights edited
            f.seek(-4, 2)
            f.write(b"\x00\x00\x80\x7f")
        with pytest.raises(CheckpointError, match="lists no sha256 for"):
            check_bundle(bad)
        assert main(["sample", "--bundle", str(bad), "--n", "1", "--out", str(tmp_path / "x.npz")]) == 2
        _one_error_line(capsys, "lists no sha256 for")
        r = subprocess.run([sys.executable, "app.py", "--bundle", str(bad)], cwd=ROOT, capture_output=True, text=True,
                           timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert r.returncode == 2 and "lists no sha256" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.npz").exists()
