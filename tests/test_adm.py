"""Issue 19 (first part): ADM presets, their exact state-dict layouts and the weights-only reader.

Golden figures: every preset's parameter count equals ADM.md's table (computed from the preset alone, no
network built), the minority head has 71 tensors, and ADM.md's example shapes hold."""
import json
import pickle

import numpy as np
import pytest
import torch

from core.errors import CheckpointError
from core.nets.adm import PRESETS, check_layout, count_parameters, describe, layout, preset, read_checkpoint, tiny


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_counts_equal_the_published_figures(name):
    p = PRESETS[name]
    # within the table's rounding; ADM.md's 54.5M for the 512 classifier is our 54,448,360 rounded twice
    # (54.448 -> 54.45 -> 54.5), so that one row gets 0.06
    tol = 0.06 if name == "gd-512-classifier" else 0.05
    assert count_parameters(p) / 1e6 == pytest.approx(p.published_params, abs=tol), name
    assert describe(p).startswith(name)


def test_layout_details_from_adm_md():
    clf = layout(PRESETS["gd-256-classifier"])
    assert clf["input_blocks.0.0.weight"] == (128, 3, 3, 3)
    assert clf["input_blocks.1.0.emb_layers.1.weight"] == (256, 512)  # scale-shift: 2 x 128 rows
    assert clf["input_blocks.10.1.qkv.weight"] == (768, 256, 1)
    assert clf["middle_block.1.qkv.weight"] == (1536, 512, 1)
    assert clf["out.2.positional_embedding"] == (512, 65) and clf["out.2.c_proj.weight"] == (1000, 512, 1)
    head = layout(PRESETS["mc-lsun-head"])
    assert len(head) == 71 and head["input_blocks.0.0.weight"] == (128, 512, 3, 3)
    assert head["out.2.positional_embedding"] == (128, 65) and head["out.2.c_proj.weight"] == (100, 128, 1)
    # every input block and the middle block of the head has attention (ds 1 is attended)
    assert all(f"input_blocks.{k}.1.qkv.weight" in head for k in (1, 2)) and "middle_block.1.qkv.weight" in head
    unc, cond = layout(PRESETS["gd-256-uncond"]), layout(PRESETS["gd-256-cond"])
    assert set(cond) - set(unc) == {"label_emb.weight"} and cond["label_emb.weight"] == (1000, 1024)
    assert unc["out.2.weight"] == (6, 256, 3, 3)  # learned sigma: eps and v
    n_in = 1 + 6 * 2 + 5
    assert max(int(k.split(".")[1]) for k in unc if k.startswith("input_blocks")) == n_in - 1
    assert max(int(k.split(".")[1]) for k in unc if k.startswith("output_blocks")) == 6 * 3 - 1
    lsun = layout(PRESETS["id-lsun"])  # no scale-shift, conv down/up samplers
    assert lsun["input_blocks.1.0.emb_layers.1.weight"] == (128, 512) and "input_blocks.3.0.op.weight" in lsun
    with pytest.raises(ValueError, match="allowed: gd-64-cond"):
        preset("nope")


def _random_state(p, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 0.02 for k, shape in layout(p).items()}


SMALL = tiny(PRESETS["gd-256-uncond"], image_size=16, model_channels=16, channel_mult=(1, 2),
             attention_resolutions=(8,), num_head_channels=8)


def test_a_matching_checkpoint_reads_and_checks(tmp_path):
    state = _random_state(SMALL)
    f = tmp_path / "m.pt"
    torch.save(state, f)
    got = read_checkpoint(f)
    check_layout(got, SMALL, str(f))
    assert all(torch.equal(got[k], state[k]) for k in state)
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pt")  # a DataParallel save
    check_layout(read_checkpoint(tmp_path / "ddp.pt"), SMALL, "ddp")


def test_full_pickle_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    f = tmp_path / "evil.pt"
    with open(f, "wb") as fh:
        pickle.dump({"x": Evil()}, fh)
    with pytest.raises(CheckpointError, match="weights-only loader"):
        read_checkpoint(f)
    assert not marker.exists()


def test_bad_files_are_one_line_each(tmp_path):
    state = _random_state(SMALL)
    f = tmp_path / "m.pt"
    torch.save(state, f)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(cut)
    with pytest.raises(CheckpointError, match="no such file"):
        read_checkpoint(tmp_path / "missing.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_checkpoint(tmp_path / "list.pt")
    bad = dict(state)
    bad["out.2.weight"] = torch.full_like(bad["out.2.weight"], float("nan"))
    with pytest.raises(CheckpointError, match="'out.2.weight' holds NaN"):
        check_layout(bad, SMALL, "x")
    short = {k: v for k, v in state.items() if k != "middle_block.1.qkv.weight"}
    with pytest.raises(CheckpointError, match="missing key 'middle_block.1.qkv.weight'; no preset has its layout"):
        check_layout(short, SMALL, "x")
    shaped = dict(state, **{"out.2.weight": torch.zeros(3, 16, 3, 3)})
    with pytest.raises(CheckpointError, match=r"'out.2.weight' has shape \(3, 16, 3, 3\)"):
        check_layout(shaped, SMALL, "x")


def test_a_wrong_preset_names_the_one_that_matches():
    head = _random_state(PRESETS["mc-lsun-head"])  # 2.9M parameters: a real full-size layout
    with pytest.raises(CheckpointError, match="not a gd-256-classifier checkpoint.*its layout is preset mc-lsun-head"):
        check_layout(head, PRESETS["gd-256-classifier"], "mc_lsun.pt")
    with pytest.raises(CheckpointError, match="not a gd-256-uncond checkpoint \\(diffusion\\).*mc-lsun-head \\(classifier\\)"):
        check_layout(head, PRESETS["gd-256-uncond"], "mc_lsun.pt")  # a classifier given as a diffusion model
    check_layout(head, PRESETS["mc-lsun-head"], "mc_lsun.pt")
    assert np.isclose(sum(v.numel() for v in head.values()) / 1e6, 2.90, atol=0.005)


# ---- equivalence of the converted diffusers UNet2DModel with a reference ADM forward --------------
VARIANTS = {  # small widths, the structure of each family
    "scale-shift, resblock up/down, legacy order, 64-ch heads": tiny(
        PRESETS["gd-256-uncond"], image_size=32, model_channels=32, channel_mult=(1, 1, 2), attention_resolutions=(16, 8),
        num_head_channels=16),
    "new attention order, class-conditional": tiny(
        PRESETS["gd-64-cond"], image_size=16, model_channels=32, channel_mult=(1, 2), attention_resolutions=(8,),
        num_head_channels=16, num_classes=10),
    "no scale-shift, conv up/down, one head": tiny(
        PRESETS["id-lsun"], image_size=32, model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(8,)),
    "fixed 4 heads, conv up/down, eps only": tiny(
        PRESETS["id-cifar10"], image_size=16, model_channels=32, channel_mult=(1, 2), attention_resolutions=(8, 16),
        out_channels=3),
    "fixed 4 heads, resblock up/down, class-conditional": tiny(
        PRESETS["gd-128-cond"], image_size=16, model_channels=32, channel_mult=(1, 2, 3), attention_resolutions=(8, 4),
        num_classes=5),
    "half-width first level (the 512 model), class-conditional": tiny(
        PRESETS["gd-512-cond"], image_size=16, model_channels=64, channel_mult=(0.5, 1, 2), attention_resolutions=(8,),
        num_head_channels=16, num_classes=5),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_converted_unet_equals_the_reference_forward(variant):
    from adm_reference import unet_forward

    from core.nets.adm import build_unet2d, convert_unet

    p = VARIANTS[variant]
    state = _state(p, 1)
    g = torch.Generator().manual_seed(1)
    net = build_unet2d(p).eval()
    missing, unexpected = net.load_state_dict(convert_unet(state, p), strict=True)
    assert not missing and not unexpected
    x = torch.randn(2, p.in_channels, p.image_size, p.image_size, generator=g)
    t = torch.tensor([3, 870])
    y = torch.tensor([1, p.num_classes - 1]) if p.num_classes else None
    with torch.no_grad():
        want = unet_forward(p, state, x, t, y)
        got = net(x, t, class_labels=y).sample
    assert got.shape == (2, p.out_channels, p.image_size, p.image_size)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    assert want.abs().mean() > 1e-2  # not a trivially zero network


def test_respacing_visits_the_official_timesteps():
    """ADM's space_timesteps(T, "S") accumulates a float stride and rounds each sum half-to-even."""
    from core.maths.schedule import make_schedule

    def official(T, n):
        stride, cur, out = (T - 1) / (n - 1), 0.0, []
        for _ in range(n):
            out.append(round(cur))
            cur += stride
        return sorted(set(out))

    for T in (1000, 4000):
        s = make_schedule("linear", T)
        for n in (2, 10, 21, 25, 50, 100, 250, 999, T):
            assert s.timesteps(n).tolist() == official(T, n), (T, n)
    assert make_schedule("linear", 1000).timesteps(21).tolist()[10] == 499  # where a rounded linspace gives 500


def test_imported_run_folder_loads_samples_and_keeps_adm_semantics(tmp_path, capsys):
    """A (small) improved-diffusion-style checkpoint with rescaled timesteps and learned sigma imported as a run
    folder: load_diffusion gives the reference forward at t * 1000 / T, and `sample --steps 10` runs on it."""
    from adm_reference import unet_forward

    from core.cli import main
    from core.nets.adm import import_diffusion
    from core.nets.models import load_diffusion

    p = tiny(PRESETS["id-cifar10"], image_size=16, model_channels=32, channel_mult=(1, 2), attention_resolutions=(8,),
             T=400)
    state = _state(p, 2)
    g = torch.Generator().manual_seed(2)
    ckpt = tmp_path / "small.pt"
    torch.save(state, ckpt)
    run = import_diffusion(ckpt, p, tmp_path / "run")
    m = load_diffusion(run)
    assert (m.schedule.name, m.schedule.T, m.variance_type, m.timestep_scale) == ("cosine", 400, "learned_range", 2.5)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([0, 399])
    out = m.predict(x, t)
    want = unet_forward(p, state, x, t.float() * 1000 / 400)
    assert torch.allclose(out.eps, want[:, :3], atol=1e-4) and torch.allclose(out.variance_values, want[:, 3:], atol=1e-4)
    assert main(["sample", "--model", str(run), "--n", "2", "--steps", "10", "--sampler", "ddpm",
                 "--out", str(tmp_path / "s.npz")]) == 0
    assert np.load(tmp_path / "s.npz")["images"].shape == (2, 16, 16, 3)


def test_a_half_width_first_level_survives_the_run_folder(tmp_path):
    """The 512 model's time embedding (model_channels wide, not the first block's half width) is rebuilt by the
    loader from model.json, so the imported run gives the reference forward."""
    from adm_reference import unet_forward

    from core.nets.adm import import_diffusion
    from core.nets.models import load_diffusion

    p = VARIANTS["half-width first level (the 512 model), class-conditional"]
    state = _state(p, 5)
    torch.save(state, tmp_path / "half.pt")
    m = load_diffusion(import_diffusion(tmp_path / "half.pt", p, tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "model.json").read_text())["time_channels"] == 64
    g = torch.Generator().manual_seed(5)
    x, t, y = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([10, 900]), torch.tensor([0, 4])
    with torch.no_grad():
        assert torch.allclose(m.predict(x, t, y).eps, unet_forward(p, state, x, t, y)[:, :3], atol=1e-4)


def test_import_adm_command_refuses_bad_inputs_and_writes_nothing(tmp_path, capsys):
    from core.cli import main

    def err():
        return capsys.readouterr().err.strip().splitlines()[-1]

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"x": Evil()}, fh)
    head = tmp_path / "mc_lsun.pt"
    torch.save(_random_state(PRESETS["mc-lsun-head"]), head)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(head.read_bytes()[:5000])
    cases = [(evil, "id-cifar10", "weights-only loader"), (cut, "id-cifar10", "not a readable PyTorch checkpoint"),
             (head, "id-cifar10", "its layout is preset mc-lsun-head (classifier)"),
             (head, "mc-lsun-head", "is a classifier: use import-adm-classifier"),
             (head, "nope", "unknown --preset 'nope'")]
    for f, name, part in cases:
        out = tmp_path / f"out-{name}"
        assert main(["import-adm", "--checkpoint", str(f), "--preset", name, "--out", str(out)]) == 2
        assert part in err(), (f, name)
        assert not out.exists()
    assert not marker.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left
    assert main(["import-adm", "--preset", "list"]) == 0
    assert "mc-lsun-head" in capsys.readouterr().out


SMALL_CLF = tiny(PRESETS["gd-256-classifier"], image_size=32, channel_mult=(1, 2, 2), attention_resolutions=(16, 8),
                 model_channels=64, out_channels=7)
SMALL_HEAD = tiny(PRESETS["mc-lsun-head"], image_size=8, in_channels=128, model_channels=64, out_channels=5)


def _state(p, seed):
    """Random weights of preset ``p``'s layout, scaled like an initialised network (GroupNorm scales near 1)."""
    g = torch.Generator().manual_seed(seed)
    s = {k: torch.randn(shape, generator=g) * (0.5 if len(shape) == 1 else 1 / np.sqrt(np.prod(shape[1:])))
         for k, shape in layout(p).items()}
    for k in s:
        if k.endswith(("norm.weight", "in_layers.0.weight", "out_layers.0.weight", "out.0.weight")):
            s[k] = 1 + 0.1 * s[k]
    return s


def test_encoder_classifier_and_minority_cascade_equal_the_reference():
    from adm_reference import encoder_forward

    from core.nets.adm_encoder import AdmEncoder, MinorityCascade

    st, sh = _state(SMALL_CLF, 3), _state(SMALL_HEAD, 4)
    trunk, head = AdmEncoder(SMALL_CLF).eval(), AdmEncoder(SMALL_HEAD).eval()
    assert {k: tuple(v.shape) for k, v in trunk.state_dict().items()} == layout(SMALL_CLF)  # ADM's own names
    trunk.load_state_dict(st, strict=True)
    head.load_state_dict(sh, strict=True)
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([10, 700])
    with torch.no_grad():
        assert torch.allclose(trunk(x, t), encoder_forward(SMALL_CLF, st, x, t), atol=1e-4)
        feats = encoder_forward(SMALL_CLF, st, x, t, features_only=True)
        assert feats.shape == (2, 128, 8, 8) and torch.allclose(trunk.features(x, t), feats, atol=1e-4)
        want = encoder_forward(SMALL_HEAD, sh, feats, t)
        assert torch.allclose(MinorityCascade(trunk, head)(x, t), want, atol=1e-4)
    # the classifier feature space (evaluate / neighbours --features classifier) reads the head's attention pool
    from core.evaluation.metrics import extract_features, make_extractor
    from core.nets.models import LoadedClassifier

    images = (torch.rand(3, 32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
    f = extract_features(make_extractor("classifier", classifier=LoadedClassifier(MinorityCascade(trunk, head), None)),
                         images)
    assert f.pooled.shape == (3, 64) and np.isfinite(f.pooled).all() and f.pooled.std() > 0
    with torch.no_grad():
        x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        logits = MinorityCascade(trunk, head)(x0, torch.zeros(3, dtype=torch.long))
        proj = head.out[2].c_proj(torch.from_numpy(f.pooled)[..., None])[:, :, 0]
    assert torch.allclose(proj, logits, atol=1e-4)  # the pooled features are exactly what c_proj reads
    # guidance's gradient flows through head and trunk
    cascade = MinorityCascade(trunk, head)
    xg = x.clone().requires_grad_(True)
    torch.log_softmax(cascade(xg, t), -1)[:, 4].sum().backward()
    assert xg.grad.abs().sum() > 0
    used = [p.grad for n, p in trunk.named_parameters() if not n.startswith("out.")]  # the trunk's own pool is unused
    assert all(gr is not None for gr in used) and all(p.grad is None for n, p in trunk.named_parameters() if n.startswith("out."))


def test_minority_classifier_imports_and_guides_the_sampler(tmp_path, monkeypatch):
    from core.maths.guidance import ClassifierGuidance, combine
    from core.maths.sampling import sample
    from core.nets import adm
    from core.nets.adm_encoder import import_classifier
    from core.nets.models import DiffusionModel, load_classifier

    torch.save(_state(SMALL_CLF, 3), tmp_path / "clf.pt")
    torch.save(_state(SMALL_HEAD, 4), tmp_path / "head.pt")
    adm_presets = dict(adm.PRESETS, **{"mc-lsun-head": SMALL_HEAD})
    import core.nets.adm_encoder as enc

    monkeypatch.setattr(enc, "preset", lambda name: adm_presets[name])  # the small head stands in for mc-lsun-head
    out = import_classifier(tmp_path / "clf.pt", SMALL_CLF, tmp_path / "mc", minority_head=str(tmp_path / "head.pt"),
                            thresholds=[0.1, 0.2, 0.3, 0.4, 0.5])
    clf = load_classifier(out)
    assert clf.thresholds == [0.1, 0.2, 0.3, 0.4, 0.5] and type(clf.net).__name__ == "MinorityCascade"
    p = tiny(PRESETS["gd-256-uncond"], image_size=32, model_channels=32, channel_mult=(1, 2), attention_resolutions=(8,),
             num_head_channels=16)
    net = adm.build_unet2d(p).eval()
    model = DiffusionModel(net, adm.adm_schedule(p), 32, 3, variance_type="learned_range")
    g = combine(ClassifierGuidance(clf.net, 4, 3.0))
    a = sample(model, 2, steps=3, sampler="ddim", guidance=g, generator=torch.Generator().manual_seed(0))
    b = sample(model, 2, steps=3, sampler="ddim", guidance=None, generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 3, 32, 32) and not torch.equal(a, b)  # the imported cascade steers the sampler
    from core.cli import main
    from core.nets.models import save_model_run

    save_model_run(tmp_path / "run", model)
    assert main(["sample", "--model", str(tmp_path / "run"), "--classifier", str(out), "--minority-class", "4",
                 "--scale", "2", "--n", "2", "--steps", "3", "--out", str(tmp_path / "s.npz")]) == 0
    assert np.load(tmp_path / "s.npz")["images"].shape == (2, 32, 32, 3)


def test_classifier_import_refusals(tmp_path):
    from core.nets.adm_encoder import import_classifier

    torch.save(_state(SMALL_CLF, 3), tmp_path / "clf.pt")
    with pytest.raises(ValueError, match="is a diffusion: use import-adm"):
        import_classifier(tmp_path / "clf.pt", PRESETS["gd-256-uncond"], tmp_path / "o")
    with pytest.raises(ValueError, match="minority head without its trunk"):
        import_classifier(tmp_path / "clf.pt", PRESETS["mc-lsun-head"], tmp_path / "o")
    with pytest.raises(CheckpointError, match="not a gd-64-classifier checkpoint"):
        import_classifier(tmp_path / "clf.pt", PRESETS["gd-64-classifier"], tmp_path / "o")
    with pytest.raises(ValueError, match="thresholds has 2 values"):
        import_classifier(tmp_path / "clf.pt", SMALL_CLF, tmp_path / "o", thresholds=[1, 2])
    other = tiny(PRESETS["gd-128-classifier"], **{f: getattr(SMALL_CLF, f) for f in (
        "image_size", "channel_mult", "attention_resolutions", "model_channels", "out_channels", "num_res_blocks",
        "num_head_channels", "num_heads")})  # the same shapes, but not the trunk the official head was trained on
    torch.save(_state(other, 3), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="--preset gd-256-classifier .* not gd-128-classifier"):
        import_classifier(tmp_path / "other.pt", other, tmp_path / "o", minority_head=str(tmp_path / "clf.pt"))
    assert not (tmp_path / "o").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_imported_model_builds_a_bundle_that_scores_and_opens_in_the_app(tmp_path):
    """score, build and the app take an imported ADM run folder unchanged (small widths, fixed 4 heads,
    rescaled timesteps: the two semantics a plain UNet2DModel config cannot carry)."""
    from core.bundles.bundle import load_bundle
    from core.cli import main
    from core.demos.faces import build_faces
    from core.nets.adm import import_diffusion
    from core.nets.models import load_diffusion

    p = tiny(PRESETS["id-cifar10"], image_size=16, model_channels=32, channel_mult=(1, 2), attention_resolutions=(8,))
    torch.save(_state(p, 7), tmp_path / "small.pt")
    run = import_diffusion(tmp_path / "small.pt", p, tmp_path / "run")
    data = tmp_path / "faces"
    build_faces(data, n=16, size=16, seed=1)
    assert main(["score", "--model", str(run), "--data", str(data), "--distance", "l2", "--draws", "1",
                 "--out", str(tmp_path / "scores.csv")]) == 0
    out = tmp_path / "bundle"
    assert main(["build", "--data", str(data), "--out", str(out), "--model", str(run), "--classes", "4",
                 "--clf-steps", "2", "--clf-base-channels", "8", "--draws", "1", "--map", "pca"]) == 0
    a, b = load_diffusion(run), load_bundle(out).model
    assert b.timestep_scale == a.timestep_scale == 0.25 and {m.heads for m in b.net.modules() if hasattr(m, "heads")} == {4}
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 3000])
    assert torch.allclose(a.predict(x, t).eps, b.predict(x, t).eps) and b.variance_type == "learned_range"
    from app import handlers as h

    run_ = h.Studio(out).generate_all(h.GenerateRequest(3, 1.0, steps=5, n=2))
    assert run_.guided.shape == (2, 16, 16, 3)
