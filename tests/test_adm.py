"""Issues 19 and 24: ADM presets, their exact state-dict layouts, the weights-only reader, and the equivalence of
the imported networks with reference forwards written from ../shared/ADM.md.

Golden figures: every preset's exact parameter count, counted here from ADM.md's architecture description
(adm_md_count, which uses neither core.nets.adm.layout nor a number stored in a preset), equals layout()'s total
and the parameters of the network built for it; ADM.md's rounded counts, file sizes and the minority head's 71
tensors hold, and so do its example shapes. The equivalence tests run in float64 with tolerances that a GroupNorm
eps of 1e-6 instead of 1e-5 exceeds by more than three orders of magnitude (measured figures beside F64_TOL and
CLF_F64_TOL)."""
import copy
import json
import pickle
from math import prod

import numpy as np
import pytest
import torch

from core.errors import CheckpointError
from core.nets.adm import PRESETS, check_layout, count_parameters, describe, layout, preset, read_checkpoint, tiny


def adm_md_count(p):
    """(parameters, tensors) of preset ``p`` counted from ../shared/ADM.md's architecture description alone,
    without core.nets.adm.layout nor any number stored in the preset: every module contributes its weight and
    bias (GroupNorm: 2c; a k x k convolution ci -> co: ci co k^2 + co; a linear i -> o: i o + o)."""
    mc, emb = p.model_channels, 4 * p.model_channels
    total = [0, 0]

    def add(*numels):
        total[0] += sum(numels)
        total[1] += len(numels)

    def gn(c):
        add(c, c)

    def conv(ci, co, k):  # Conv2d k x k, or Conv1d (k = 1: the attention's qkv / proj_out, the pool's projections)
        add(ci * co * k * k, co)

    def res(ci, co):  # in_layers GN + conv3, emb_layers linear (2co with scale-shift), out_layers GN + conv3, skip
        gn(ci)
        conv(ci, co, 3)
        conv(emb, 2 * co if p.use_scale_shift_norm else co, 1)
        gn(co)
        conv(co, co, 3)
        if ci != co:
            conv(ci, co, 1)

    def attention(c):  # norm, qkv (3c, c, 1), proj_out (c, c, 1)
        gn(c)
        conv(c, 3 * c, 1)
        conv(c, c, 1)

    widths = [int(m * mc) for m in p.channel_mult]
    attention_ds = {p.image_size // r for r in p.attention_resolutions}
    attended = [2 ** level in attention_ds for level in range(len(widths))]  # level l has ds = 2^l
    conv(mc, emb, 1)  # time_embed.0
    conv(emb, emb, 1)  # time_embed.2
    if p.kind == "diffusion" and p.num_classes:
        add(p.num_classes * emb)  # label_emb (no bias)
    conv(p.in_channels, widths[0], 3)
    skips = [widths[0]]
    c = widths[0]
    for level, w in enumerate(widths):
        for _ in range(p.num_res_blocks):
            res(c, w)
            c = w
            if attended[level]:
                attention(c)
            skips.append(c)
        if level < len(widths) - 1:  # the downsampler: a resblock, or a stride-2 conv3
            if p.resblock_updown:
                res(c, c)
            else:
                conv(c, c, 3)
            skips.append(c)
    res(c, c)  # the middle block
    attention(c)
    res(c, c)
    if p.kind == "classifier":  # GN, SiLU, AttentionPool2d
        gn(c)
        side = p.image_size // 2 ** (len(widths) - 1)
        add(c * (side * side + 1))  # positional embedding
        conv(c, 3 * c, 1)  # qkv_proj
        conv(c, p.out_channels, 1)  # c_proj
        return tuple(total)
    for level in reversed(range(len(widths))):
        for i in range(p.num_res_blocks + 1):
            res(c + skips.pop(), widths[level])
            c = widths[level]
            if attended[level]:
                attention(c)
            if level and i == p.num_res_blocks:  # the upsampler: a resblock, or nearest x2 then a conv3
                if p.resblock_updown:
                    res(c, c)
                else:
                    conv(c, c, 3)
    assert not skips
    gn(c)
    conv(c, p.out_channels, 3)
    return tuple(total)


# ../shared/ADM.md's tables: parameters in millions (diffusion: 1 decimal; the minority head: 2 decimals)
ADM_MD_MILLIONS = {
    "gd-64-cond": 295.9, "gd-128-cond": 421.5, "gd-256-cond": 553.8, "gd-256-uncond": 552.8, "gd-512-cond": 559.0,
    "gd-lsun-bedroom": 552.8, "gd-lsun-cat": 552.8, "gd-lsun-horse": 552.8, "id-cifar10": 52.5,
    "id-imagenet64-uncond": 121.1, "id-imagenet64-cond": 273.0, "id-lsun": 113.7, "gd-64-classifier": 65.4,
    "gd-128-classifier": 42.6, "gd-256-classifier": 54.1, "gd-512-classifier": 54.5, "mc-lsun-head": 2.90}
# ADM.md's file sizes (fp32, 4 bytes a parameter, decimal units), where it gives one
ADM_MD_BYTES = {"gd-64-cond": (1.18e9, 0.005e9), "gd-256-cond": (2.2e9, 0.05e9), "gd-256-uncond": (2.21e9, 0.005e9),
                "gd-64-classifier": (262e6, 0.5e6), "gd-256-classifier": (216e6, 0.5e6),
                "mc-lsun-head": (11.6e6, 0.05e6)}


def test_every_preset_is_in_adm_md_tables():
    assert set(ADM_MD_MILLIONS) == set(PRESETS)


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_counts_are_exact(name):
    """The exact integer count from ADM.md's architecture equals layout()'s total and the parameters of the network
    built for the preset (on the meta device: no memory, full size); for diffusion presets, convert_unet gives
    every tensor of the diffusers model its exact shape. ADM.md's rounded figures and file sizes hold too."""
    from core.nets.adm import build_unet2d, convert_unet
    from core.nets.adm_encoder import AdmEncoder

    p = PRESETS[name]
    n, tensors = adm_md_count(p)
    assert count_parameters(p) == n and len(layout(p)) == tensors
    with torch.device("meta"):
        net = build_unet2d(p) if p.kind == "diffusion" else AdmEncoder(p)
    built = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert sum(prod(s) for s in built.values()) == n
    if p.kind == "diffusion":
        converted = convert_unet({k: torch.empty(s, device="meta") for k, s in layout(p).items()}, p)
        assert {k: tuple(v.shape) for k, v in converted.items()} == built
    else:
        assert built == layout(p) and len(built) == tensors  # ADM's own names, one module per tensor
    # ADM.md's 54.5M for the 512 classifier is 54,448,360 rounded twice (54.448 -> 54.45 -> 54.5): 0.06 there
    tol = 0.005 if name == "mc-lsun-head" else 0.06 if name == "gd-512-classifier" else 0.05
    assert abs(n / 1e6 - ADM_MD_MILLIONS[name]) <= tol, n
    assert p.published_params == ADM_MD_MILLIONS[name]  # the preset's own record agrees with the table
    if name in ADM_MD_BYTES:
        size, rounding = ADM_MD_BYTES[name]
        assert abs(4 * n - size) <= rounding, 4 * n
    if name == "mc-lsun-head":
        assert tensors == 71  # ADM.md: 71 tensors
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
    marker, f = _evil_pickle(tmp_path)
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


# float64 tolerance of the equivalence tests. Measured on these variants: the correct code differs from the
# reference by at most 9.3e-15 (outputs up to 3.9 in size); with GroupNorm eps 1e-6 instead of ADM's 1e-5 in
# unet_config the difference is 2.9e-5 to 7.0e-5 (in float32 the same mutation gives 2.9e-5 to 7.0e-5 against a
# float32 noise floor of 1.8e-6 to 4.3e-6, so the old float32 tolerance 1e-4 passed it). 1e-9 sits five orders
# of magnitude above the first and four below the second.
F64_TOL = 1e-9


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_converted_unet_equals_the_reference_forward(variant):
    """The converted diffusers UNet2DModel and the reference ADM forward (tests/adm_reference.py), in float64 to
    F64_TOL, and in float32 (how it samples) to 1e-4."""
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
        want32 = unet_forward(p, state, x, t, y)
        got32 = net(x, t, class_labels=y).sample
        want = unet_forward(p, {k: v.double() for k, v in state.items()}, x.double(), t, y)
        got = net.double()(x.double(), t, class_labels=y).sample
    assert got.dtype == want.dtype == torch.float64
    assert got.shape == (2, p.out_channels, p.image_size, p.image_size)
    assert (got - want).abs().max() < F64_TOL, (got - want).abs().max()
    assert torch.allclose(got32, want32, atol=1e-4, rtol=1e-4), (got32 - want32).abs().max()
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




class _Evil:
    """Pickling it records a call to open(marker, "w"): loading it must never create ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_pickle(tmp_path, name="evil.pt"):
    """(marker, path): a plain pickle whose loading would create ``marker``."""
    marker = tmp_path / "ran"
    path = tmp_path / name
    with open(path, "wb") as fh:
        pickle.dump({"x": _Evil(marker)}, fh)
    return marker, path


def test_import_adm_command_refuses_bad_inputs_and_writes_nothing(tmp_path, capsys):
    from core.cli import main

    def err():
        return capsys.readouterr().err.strip().splitlines()[-1]

    marker, evil = _evil_pickle(tmp_path)
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


def test_importer_messages_say_what_the_file_is_and_which_option_named_it(tmp_path, capsys):
    """One error line (exit 2) for each bad file: random bytes are 'not a PyTorch checkpoint (neither a zip
    archive nor a pickle)', not a pickle refused by the weights-only loader; a pickle that would run code is
    refused with the loader's reason; and the message names the option the file came from (--checkpoint or
    --minority-head)."""
    import warnings

    from core.cli import main

    marker, evil = _evil_pickle(tmp_path)
    evil2 = tmp_path / "evil2.pt"
    torch.save({"w": torch.zeros(2), "x": _Evil(marker)}, evil2)  # torch.save's own zip format, with a non-tensor object
    noise = tmp_path / "random.pt"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    trunk = tmp_path / "trunk.pt"
    torch.save(_state(SMALL_CLF, 3), trunk)  # readable; the head is read before any layout is checked

    def run(*args):
        capsys.readouterr()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a warning would be a second line on the terminal
            code = main(list(args))
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (code, lines)
        return lines[0]

    not_pt = "not a PyTorch checkpoint (neither a zip archive nor a pickle"
    out = str(tmp_path / "out")
    line = run("import-adm", "--checkpoint", str(noise), "--preset", "id-cifar10", "--out", out)
    assert line.startswith(f"error: --checkpoint {noise}: {not_pt}") and "weights-only" not in line, line
    assert f"--checkpoint {empty}: an empty file" in run("import-adm", "--checkpoint", str(empty), "--preset",
                                                         "id-cifar10", "--out", out)
    for f in (evil, evil2):
        line = run("import-adm", "--checkpoint", str(f), "--preset", "id-cifar10", "--out", out)
        assert line.startswith(f"error: --checkpoint {f}: refused by the weights-only loader (a pickle"), line
        assert "Unsupported" in line and "weights_only` set to `False`" not in line, line
    clf = ["import-adm-classifier", "--preset", "gd-256-classifier", "--out", out]
    line = run(*clf, "--checkpoint", str(trunk), "--minority-head", str(evil))
    assert line.startswith(f"error: --minority-head {evil}: refused by the weights-only loader"), line
    line = run(*clf, "--checkpoint", str(trunk), "--minority-head", str(noise))
    assert line.startswith(f"error: --minority-head {noise}: {not_pt}"), line
    line = run(*clf, "--checkpoint", str(evil2), "--minority-head", str(trunk))
    assert line.startswith(f"error: --checkpoint {evil2}: refused by the weights-only loader"), line
    line = run(*clf, "--checkpoint", str(trunk), "--minority-head", str(trunk))  # a readable file of the wrong layout
    assert line.startswith(f"error: --checkpoint {trunk}: not a gd-256-classifier checkpoint"), line
    line = run(*clf, "--checkpoint", str(trunk), "--minority-head", str(tmp_path / "missing.pt"))
    assert line == f"error: --minority-head {tmp_path / 'missing.pt'}: no such file", line
    assert not marker.exists() and not (tmp_path / "out").exists()


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


def _double(state):
    return {k: v.double() for k, v in state.items()}


# float64 tolerance of the classifier equivalence test. Measured: the correct code differs from
# tests/adm_classifier_reference.py by at most 1.8e-15 (logits), 1.1e-14 (trunk features, up to 14 in size),
# 4.4e-16 (head and cascade logits). Mutations of core/nets/adm_encoder.py, largest / smallest of the four differences: GroupNorm eps 1e-6
# 2.3e-4 (features) / 1.5e-6 (head logits); eps 1.1e-5 2.6e-5 / 1.6e-7; attention scale x 1.0001 1.5e-4 / 1.7e-5.
# In float32 (noise: logits up to 7e-7, features up to 7e-6) the 1e-4 checks below let eps 1.1e-5 through.
CLF_F64_TOL = 1e-9


def test_encoder_classifier_and_minority_cascade_equal_the_reference():
    """AdmEncoder and MinorityCascade against tests/adm_classifier_reference.py (written from ADM.md, sharing no
    code with core/nets/adm_encoder.py): in float64 to CLF_F64_TOL, and in float32 to 1e-4."""
    from adm_classifier_reference import cascade_logits, classifier_logits, trunk_features

    from core.nets.adm_encoder import AdmEncoder, MinorityCascade

    st, sh = _state(SMALL_CLF, 3), _state(SMALL_HEAD, 4)
    trunk, head = AdmEncoder(SMALL_CLF).eval(), AdmEncoder(SMALL_HEAD).eval()
    assert {k: tuple(v.shape) for k, v in trunk.state_dict().items()} == layout(SMALL_CLF)  # ADM's own names
    trunk.load_state_dict(st, strict=True)
    head.load_state_dict(sh, strict=True)
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([10, 700])
    with torch.no_grad():
        trunk64, head64 = copy.deepcopy(trunk).double(), copy.deepcopy(head).double()
        x64, st64, sh64 = x.double(), _double(st), _double(sh)
        feats64 = trunk_features(SMALL_CLF, st64, x64, t)
        errors = {
            "logits": trunk64(x64, t) - classifier_logits(SMALL_CLF, st64, x64, t),
            "features": trunk64.features(x64, t) - trunk_features(SMALL_CLF, st64, x64, t),
            "head logits": head64(feats64, t) - classifier_logits(SMALL_HEAD, sh64, feats64, t),
            "cascade logits": MinorityCascade(trunk64, head64)(x64, t) - cascade_logits(SMALL_CLF, st64, SMALL_HEAD,
                                                                                          sh64, x64, t)}
        assert all(e.dtype == torch.float64 for e in errors.values())
        worst = {k: float(e.abs().max()) for k, e in errors.items()}
        assert max(worst.values()) < CLF_F64_TOL, worst
        assert float(classifier_logits(SMALL_HEAD, sh64, feats64, t).std()) > 0.1  # not a constant head
        assert torch.allclose(trunk(x, t), classifier_logits(SMALL_CLF, st, x, t), atol=1e-4)  # float32, as it runs
        feats = trunk_features(SMALL_CLF, st, x, t)
        assert feats.shape == (2, 128, 8, 8) and torch.allclose(trunk.features(x, t), feats, atol=1e-4, rtol=1e-5)
        assert torch.allclose(MinorityCascade(trunk, head)(x, t), cascade_logits(SMALL_CLF, st, SMALL_HEAD, sh, x, t),
                              atol=1e-4)
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
    from adm_classifier_reference import cascade_logits

    from core.maths.guidance import ClassifierGuidance, combine
    from core.maths.sampling import sample_ddim
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
    # the imported cascade steers the sampler by exactly ADM's term: at the first DDIM step (original t = 999) the
    # guided x0_hat is the unguided one plus (1 - abar) / sqrt(abar) * w * grad_x log p(4 | x_T, 999), the gradient
    # taken here in float64 through the reference cascade (tests/adm_classifier_reference.py) on the saved weights
    ts = model.schedule.timesteps(3)
    x_T = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    first = {}
    for name, guidance in (("guided", g), ("plain", None)):
        seen = []
        first[name] = (sample_ddim(model, x_T, ts, guidance=guidance, callback=seen.append), seen[0])
    t0 = int(ts[-1])
    assert t0 == 999 and first["guided"][0].shape == (2, 3, 32, 32)
    x = x_T.double().requires_grad_(True)
    logits = cascade_logits(SMALL_CLF, _double(torch.load(tmp_path / "clf.pt", weights_only=True)), SMALL_HEAD,
                            _double(torch.load(tmp_path / "head.pt", weights_only=True)), x, torch.full((2,), t0))
    (grad,) = torch.autograd.grad(torch.log_softmax(logits, dim=-1)[:, 4].sum(), x)
    abar = float(model.schedule.abar[t0])
    want = (1 - abar) / abar ** 0.5 * 3.0 * grad
    got = first["guided"][1].x0_hat.double() - first["plain"][1].x0_hat.double()
    assert float(want.abs().max()) > 0.5  # a shift of a quarter of the data range or more (measured 0.79)
    # measured: 1.3e-6 for a largest shift of 0.79 (float32 sampling against the float64 reference)
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max()), float((got - want).abs().max())
    assert not torch.equal(first["guided"][0], first["plain"][0])
    from core.cli import main
    from core.nets.models import save_model_run

    save_model_run(tmp_path / "run", model)
    assert main(["sample", "--model", str(tmp_path / "run"), "--classifier", str(out), "--minority-class", "4",
                 "--scale", "2", "--n", "2", "--steps", "3", "--out", str(tmp_path / "s.npz")]) == 0
    assert np.load(tmp_path / "s.npz")["images"].shape == (2, 32, 32, 3)


def test_classifier_import_refusals(tmp_path, monkeypatch):
    import core.nets.adm_encoder as enc
    from core.nets.adm_encoder import import_classifier

    torch.save(_state(SMALL_CLF, 3), tmp_path / "clf.pt")
    with monkeypatch.context() as m:  # the small head stands in for mc-lsun-head; the trunk file is given as the head
        m.setattr(enc, "preset", lambda name: dict(PRESETS, **{"mc-lsun-head": SMALL_HEAD})[name])
        with pytest.raises(CheckpointError, match=r"^--minority-head \S*clf.pt: not a mc-lsun-head checkpoint"):
            import_classifier(tmp_path / "clf.pt", SMALL_CLF, tmp_path / "o", minority_head=str(tmp_path / "clf.pt"))
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
