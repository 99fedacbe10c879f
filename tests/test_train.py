"""Training loops: resume is exact, NaN losses never reach a checkpoint, a kill never corrupts one."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core.nets.checkpoint import load_tensors
from core.bundles.data import load_image_folder
from core.errors import MinorityError
from core.nets.models import UNetConfig, load_diffusion
from core.nets.train import DiffusionTrainConfig, train_diffusion
from test_cli import make_images

ROOT = Path(__file__).resolve().parent.parent


def _cfg(steps, save_every=2):
    return DiffusionTrainConfig(steps=steps, batch_size=4, save_every=save_every, seed=3,
                                unet=UNetConfig(image_size=16, channels=1, block_out_channels=(8, 16), attention=False))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    make_images(folder, 12)
    return load_image_folder(folder, 16, 1)


def test_resume_equals_uninterrupted(data, tmp_path):
    train_diffusion(data, tmp_path / "full", _cfg(8))
    train_diffusion(data, tmp_path / "half", _cfg(4))
    train_diffusion(data, tmp_path / "half", _cfg(8), resume=True)
    a, b = load_tensors(tmp_path / "full" / "train_state.safetensors"), load_tensors(tmp_path / "half" / "train_state.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a) and any(k.startswith("ema.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = load_diffusion(tmp_path / "full"), load_diffusion(tmp_path / "half")
    for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(va, vb), k


def test_nan_loss_stops_cleanly_and_never_writes_nan(data, tmp_path, monkeypatch):
    import core.nets.train as tr

    real = tr.F.mse_loss
    calls = {"n": 0}

    def poisoned(a, b):
        calls["n"] += 1
        loss = real(a, b)
        return loss * float("nan") if calls["n"] > 2 else loss  # two good steps, then NaN for ever

    monkeypatch.setattr(tr.F, "mse_loss", poisoned)
    with pytest.raises(MinorityError, match="non-finite losses"):
        train_diffusion(data, tmp_path / "run", _cfg(6, save_every=1))
    state = load_tensors(tmp_path / "run" / "train_state.safetensors")
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    model = load_diffusion(tmp_path / "run")  # loads: every tensor is checked finite on load
    assert int(__import__("json").loads((tmp_path / "run" / "model.json").read_text())["step"]) == 2
    assert model is not None


def test_sigkill_never_leaves_a_broken_checkpoint(data, tmp_path):
    """Kill training at random moments; the newest checkpoint always loads, and resume continues."""
    run = tmp_path / "run"
    folder = Path(data.root)
    cmd = [sys.executable, "-m", "core", "train-diffusion", "--data", str(folder), "--out", str(run), "--size", "16",
           "--widths", "8,16", "--no-attention", "--batch-size", "4", "--steps", "400", "--save-every", "1", "--resume"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    steps = []
    for _ in range(4):
        state = run / "train_state.safetensors"
        before = state.stat().st_mtime_ns if state.exists() else None
        p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60  # wait until this process has written a checkpoint, then kill at random
        while time.time() < deadline and (not state.exists() or state.stat().st_mtime_ns == before):
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        model = load_diffusion(run)  # must never raise
        assert model.image_size == 16
        steps.append(load_state_step(run))
    assert steps == sorted(steps) and steps[-1] > steps[0] > 0, f"resume must continue: {steps}"


def load_state_step(run):
    import json

    from safetensors import safe_open

    with safe_open(str(run / "train_state.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()["state"])["step"]


class _MeanOracle(torch.nn.Module):
    """Reads the class from the image mean, undoing Eq. 1's scaling with the known abar_t."""

    def __init__(self, schedule, num_classes):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.abar, self.L = schedule.abar, num_classes

    def forward(self, x_t, t, cls=None):
        x0_mean = x_t.mean((1, 2, 3)) / self.abar[t].sqrt()  # noise averages out over the pixels
        level = ((x0_mean + 1) / 2 * (self.L - 1)).round().clamp(0, self.L - 1).long()
        return torch.nn.functional.one_hot(level, self.L).float() * 20


def test_classifier_metrics_oracle_and_constant():
    from core.maths.schedule import make_schedule
    from core.nets.train import evaluate_classifier

    schedule = make_schedule("linear", 1000)
    L = 5
    labels = torch.arange(200) % L
    images = (labels.float() / (L - 1) * 255).round().to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 32, 32).clone()
    m = evaluate_classifier(_MeanOracle(schedule, L), schedule, images, labels, None, seed=0)
    assert m["val_acc_low_t"] == 1.0 and m["val_mae_low_t"] == 0.0  # little noise: the oracle is exact
    assert m["val_rank_corr"] > 0.5 and m["val_acc"] < 1.0  # at large t even the oracle guesses
    const = torch.nn.Linear(1, 1)
    const.forward = lambda x_t, t, cls=None: torch.zeros(len(x_t), L).index_fill_(1, torch.tensor([2]), 1.0)
    c = evaluate_classifier(const, schedule, images, labels, None, seed=0)
    assert c["val_acc"] == pytest.approx(1 / L) and c["val_rank_corr"] == 0.0
    assert c["val_mae"] == pytest.approx((2 + 1 + 0 + 1 + 2) / L)
