"""Issue 26.4: the Space: a run-time-only requirements list, ZeroGPU's @spaces.GPU where `spaces` exists."""
import functools
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEST_TOOLS = ("pytest", "hypothesis", "playwright")
sys.path.insert(0, str(ROOT / "tools"))


def names(requirements: str) -> set:
    return {line.split("=")[0].split(">")[0].split("<")[0].strip().lower()
            for line in requirements.splitlines() if line.strip() and not line.startswith(("#", "-r"))}


def test_the_space_folder_has_the_app_and_a_run_time_requirements_list(tmp_path):
    import gradio
    from make_space import make_space

    out = make_space(tmp_path / "space", "zero-a10g")
    reqs = (out / "requirements.txt").read_text()
    assert not names(reqs) & set(TEST_TOOLS) and {"torch", "gradio", "diffusers"} <= names(reqs)
    readme = (out / "README.md").read_text()
    assert readme.startswith("---\n") and f"sdk_version: {gradio.__version__}\n" in readme
    assert "app_file: app.py" in readme and "suggested_hardware: zero-a10g" in readme
    assert (out / "app.py").is_file() and (out / "core" / "maths" / "solvers.py").is_file()
    assert (out / "assets" / "mri-atrophy" / "manifest.json").is_file()
    assert not list(out.rglob("__pycache__"))
    # the developers' list is the run-time list plus the tools
    dev = (ROOT / "requirements.txt").read_text()
    assert "-r requirements-space.txt" in dev and set(TEST_TOOLS) <= names(dev)
    with pytest.raises(SystemExit, match="exists and is not empty"):
        make_space(out)


BLOCKER = """
import importlib.machinery
_find = importlib.machinery.PathFinder.find_spec.__func__
def find_spec(cls, name, path=None, target=None):  # as if not installed: find_spec says None, import fails
    return None if name.split('.')[0] in {blocked!r} else _find(cls, name, path, target)
importlib.machinery.PathFinder.find_spec = classmethod(find_spec)
"""


def test_the_app_runs_with_only_the_space_list():
    """With the test and build tools unimportable (as on a Space), the app builds its page, generates, scores
    an upload and draws its density panel."""
    blocked = {"pytest", "hypothesis", "playwright", "umap", "pytorch_fid", "_pytest"}
    script = BLOCKER.format(blocked=blocked) + """
import numpy as np
from app import handlers as h, verdicts as v
from app.ui import build_ui
s = h.Studio(h.DEFAULT_BUNDLE)
build_ui(s)
run = s.generate_all(h.GenerateRequest(49, 2.0, steps=5, n=2, seed=1, sampler="DPM-Solver++ 2M"))
h.on_density(s, h.Visit().add(run))
from PIL import Image
import tempfile, os
d = tempfile.mkdtemp(); p = os.path.join(d, "x.png")
Image.fromarray(run.guided[0][:, :, 0]).save(p)
out = v.on_upload(s, p, owned=lambda path: True)
print("OK", run.guided.shape)
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK (2, 32, 32, 1)" in r.stdout, r.stderr[-2000:]


def test_gpu_work_carries_spaces_gpu_when_spaces_is_importable(monkeypatch):
    from app import handlers as h
    from app import ui

    wrapped = []

    def GPU(fn):  # noqa: N802 - the spaces package's name
        wrapped.append(fn)
        return fn

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=GPU))
    demo = ui.build_ui(h.Studio(h.DEFAULT_BUNDLE))
    apis = {fn.api_name: fn for fn in demo.fns.values()}
    assert len(wrapped) >= 3  # generate (Generate and the live sliders share it), the upload, the slice slider
    assert any(apis["generate"].fn is w for w in wrapped) and any(apis["score_image"].fn is w for w in wrapped)
    monkeypatch.delitem(sys.modules, "spaces")
    f = functools.partial(print)
    assert ui.gpu(f) is f  # without spaces: the function itself


def test_the_device_is_cuda_only_on_a_zerogpu_space(monkeypatch):
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("app_entry", ROOT / "app.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    assert entry.app_device("cpu") == "cpu" and entry.app_device("cuda") == "cuda"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "spaces" else real(name, *a))
    assert entry.app_device("auto") == "cpu"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "spaces" else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert entry.app_device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert entry.app_device("auto") == "cpu"
