"""Issue 25 §2: every ADM checkpoint from the flags its README prints (``import-adm --flags``,
``import-adm-classifier --flags``).

The flags strings below are copied from the releases' READMEs (openai/guided-diffusion, openai/improved-diffusion,
soobin-um/minority-guidance), not produced by the code under test; each must give exactly the model of the preset
that stands for that release. The paper's CelebA-64 backbone, which no preset covers, has its parameter count
pinned as an integer counted from ../shared/ADM.md's architecture (tests/test_adm.py's adm_md_count), and a tiny
checkpoint of its layout imports by flags, equals the reference ADM forward (new attention order, no label
embedding) and samples."""
import json
import shlex
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from core.cli import main
from core.nets import adm, adm_flags
from core.nets.adm import FLAGS_NAME, PRESETS, count_parameters, layout, tiny
from core.nets.adm_flags import parse_flags, preset_flags, same_model
from test_adm import _state, adm_md_count

GD = "--diffusion_steps 1000 --learn_sigma True --resblock_updown True --use_fp16 True --use_scale_shift_norm True"
_GD256 = (f"--attention_resolutions 32,16,8 --image_size 256 --noise_schedule linear --num_channels 256 "
          f"--num_head_channels 64 --num_res_blocks 2 {GD}")
LSUN_GD = f"{_GD256} --class_cond False --dropout 0.1"
CIFAR10_ID = ("--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3 "
              "--diffusion_steps 4000 --noise_schedule cosine")
# (codebase, MODEL_FLAGS [+ DIFFUSION_FLAGS]) as the READMEs print them, for each release a preset stands for
PUBLISHED = {
    "gd-64-cond": ("guided", "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 "
                             "--image_size 64 --learn_sigma True --noise_schedule cosine --num_channels 192 "
                             "--num_head_channels 64 --num_res_blocks 3 --resblock_updown True "
                             "--use_new_attention_order True --use_fp16 True --use_scale_shift_norm True"),
    "gd-128-cond": ("guided", "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 128 "
                              "--learn_sigma True --noise_schedule linear --num_channels 256 --num_heads 4 "
                              "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True"),
    "gd-256-cond": ("guided", f"{_GD256} --class_cond True"),
    "gd-256-uncond": ("guided", f"{_GD256} --class_cond False"),
    "gd-512-cond": ("guided", _GD256.replace("--image_size 256", "--image_size 512").replace("--use_fp16 True",
                                                                                            "--use_fp16 False")
                    + " --class_cond True"),
    "gd-lsun-bedroom": ("guided", LSUN_GD),
    "gd-lsun-cat": ("guided", LSUN_GD),
    "gd-lsun-horse": ("guided", LSUN_GD.replace("--dropout 0.1", "--dropout 0.0")),  # lsun_horse_nodropout.pt
    "id-cifar10": ("improved", CIFAR10_ID + " --use_kl True"),  # the _vlb release's DIFFUSION_FLAGS
    "id-imagenet64-uncond": ("improved", "--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True "
                                         "--diffusion_steps 4000 --noise_schedule cosine"),
    "id-imagenet64-cond": ("improved", "--image_size 64 --num_channels 192 --num_res_blocks 3 --learn_sigma True "
                                       "--class_cond True --diffusion_steps 4000 --noise_schedule cosine "
                                       "--rescale_learned_sigmas False --rescale_timesteps False"),
    # the 2400K release's DIFFUSION_FLAGS repeat --use_scale_shift_norm False
    "id-lsun": ("improved", "--image_size 256 --num_channels 128 --num_res_blocks 2 --num_heads 1 --learn_sigma True "
                            "--use_scale_shift_norm False --attention_resolutions 16 --diffusion_steps 1000 "
                            "--noise_schedule linear --rescale_learned_sigmas False --rescale_timesteps False "
                            "--use_scale_shift_norm False"),
    # guided-diffusion's sampling commands give the classifiers the model's --image_size (and the 64 one
    # --classifier_depth 4); its README prints the 128 one's CLASSIFIER_FLAGS in full, with the sampling flags
    "gd-64-classifier": ("classifier", "--image_size 64 --classifier_depth 4"),
    "gd-128-classifier": ("classifier", "--image_size 128 --classifier_attention_resolutions 32,16,8 "
                                        "--classifier_depth 2 --classifier_width 128 --classifier_pool attention "
                                        "--classifier_resblock_updown True --classifier_use_scale_shift_norm True "
                                        "--classifier_scale 1.0 --classifier_use_fp16 True"),
    "gd-256-classifier": ("classifier", "--image_size 256"),
    "gd-512-classifier": ("classifier", "--image_size 512"),
    "mc-lsun-head": ("classifier", "--latent_size 8 --in_channels 512 --out_channels 100 "
                                   "--classifier_attention_resolutions 8 --classifier_depth 2 --classifier_width 128 "
                                   "--classifier_pool attention --classifier_resblock_updown False "
                                   "--classifier_use_scale_shift_norm True --diffusion_steps 1000 "
                                   "--noise_schedule linear"),
}
# the paper's CelebA-64 backbone (minority-guidance, sg-minority, Boost-and-Skip), as the issue quotes it
CELEBA64 = ("--diffusion_steps 1000 --noise_schedule cosine --image_size 64 --class_cond False --num_channels 192 "
            "--num_head_channels 64 --num_res_blocks 3 --attention_resolutions 32,16,8 --resblock_updown True "
            "--use_new_attention_order True --learn_sigma True --dropout 0.1 --use_scale_shift_norm True "
            "--use_fp16 True")
# counted by adm_md_count from ADM.md's architecture: 64 px, 192 channels, 3 blocks, mult (1, 2, 3, 4), attention
# at ds 2, 4, 8, scale-shift, resblock up/down, no label embedding, 6 outputs; the 64x64_diffusion.pt model
# less its label embedding (1000 x 768)
CELEBA64_PARAMS, CELEBA64_TENSORS = 295_136_454, 540


def _parse(codebase, flags):
    return parse_flags(flags, "classifier") if codebase == "classifier" else parse_flags(flags, "diffusion", codebase)


def test_every_preset_has_its_published_flags():
    assert set(PUBLISHED) == set(PRESETS)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_flags_give_the_preset(name):
    """The README's flags, with the codebase's defaults for the rest, describe exactly the preset's model: the
    same layout, the same converted network, the same schedule, variance and timestep scaling."""
    codebase, flags = PUBLISHED[name]
    got = _parse(codebase, flags).preset
    want = PRESETS[name]
    assert same_model(got, want) and layout(got) == layout(want)
    assert got.name != FLAGS_NAME and same_model(PRESETS[got.name], want)
    if want.kind == "diffusion":
        assert adm.unet_config(got) == adm.unet_config(want) and adm.variance_type(got) == "learned_range"
        assert (got.schedule, got.T, got.rescale_timesteps, got.num_heads if got.num_head_channels == -1 else None) \
            == (want.schedule, want.T, want.rescale_timesteps, want.num_heads if want.num_head_channels == -1 else None)


def test_absent_flags_take_each_codebases_own_defaults():
    """guided-diffusion's and improved-diffusion's model_and_diffusion_defaults (ADM.md: attention 16,8, 4 heads,
    scale-shift; guided-diffusion no rescaled timesteps, improved-diffusion rescaled), channel_mult by image size,
    attention resolutions read as image resolutions; what only changes the run (heads in force, the head count
    beside a head width) decides which preset matches."""
    g, i = parse_flags("--image_size 64").preset, parse_flags("--image_size 64", codebase="improved").preset
    for p in (g, i):
        assert (p.model_channels, p.num_res_blocks, p.channel_mult, p.attention_ds, p.num_heads, p.num_head_channels,
                p.use_scale_shift_norm, p.resblock_updown, p.new_attention_order, p.num_classes, p.out_channels,
                p.schedule, p.T, adm.variance_type(p)) == \
            (128, 2, (1, 2, 3, 4), {4, 8}, 4, -1, True, False, False, 0, 3, "linear", 1000, "fixed_large")
    assert (g.rescale_timesteps, i.rescale_timesteps) == (False, True)
    mults = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4),
             32: (1, 2, 2, 2)}
    for size, mult in mults.items():
        assert parse_flags(f"--image_size {size} --attention_resolutions 8").preset.channel_mult == mult
        if size in (256, 64, 32):
            assert parse_flags(f"--image_size {size} --attention_resolutions 8", codebase="improved").preset \
                .channel_mult == mult
    assert parse_flags("--image_size 256 --attention_resolutions 32,16,8").preset.attention_ds == {8, 16, 32}
    # heads decide the converted model, not the layout: 8 heads are not the 128 model's 4
    flags = PUBLISHED["gd-128-cond"][1]
    assert parse_flags(flags).preset.name == "gd-128-cond"
    other = parse_flags(flags.replace("--num_heads 4", "--num_heads 8")).preset
    assert other.name == FLAGS_NAME and layout(other) == layout(PRESETS["gd-128-cond"])
    # a head count beside a head width changes nothing (ADM uses the width)
    assert parse_flags(f"{_GD256} --class_cond True --num_heads 1").preset.name == "gd-256-cond"


def test_preset_list_prints_flags_that_round_trip_for_every_preset(capsys):
    """`--preset list`: each preset's line, then the command whose --flags give that preset's model again."""
    assert main(["import-adm", "--preset", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    seen = {}
    for head, command in zip(lines[::2], lines[1::2]):
        name = head.split()[0]
        words = shlex.split(command)
        assert words[0] == ("import-adm-classifier" if PRESETS[name].kind == "classifier" else "import-adm")
        opts = dict(zip(words[1::2], words[2::2]))
        parsed = parse_flags(opts["--flags"], PRESETS[name].kind, opts.get("--codebase", "guided"))
        assert same_model(parsed.preset, PRESETS[name]) and layout(parsed.preset) == layout(PRESETS[name]), name
        assert preset_flags(PRESETS[name])[1] == opts["--flags"]
        seen[name] = opts
    assert set(seen) == set(PRESETS) and len(lines) == 2 * len(PRESETS)
    assert seen["id-cifar10"]["--codebase"] == "improved" and seen["gd-lsun-bedroom"]["--codebase"] == "guided"
    assert "--channel_mult" not in seen["gd-512-cond"]["--flags"]  # the 512 model's 0.5 comes from its default
    assert main(["import-adm-classifier", "--preset", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[::2]] == [n for n, p in PRESETS.items() if p.kind == "classifier"]


def test_celeba64_parameter_count_is_exact():
    """The CelebA-64 layout's count is an integer from ADM.md's architecture (adm_md_count on the layout written
    out here), which the flags' layout has, tensor for tensor; no preset has it."""
    described = SimpleNamespace(kind="diffusion", image_size=64, model_channels=192, num_res_blocks=3,
                                channel_mult=(1, 2, 3, 4), attention_resolutions=(32, 16, 8), use_scale_shift_norm=True,
                                resblock_updown=True, num_classes=0, in_channels=3, out_channels=6)
    assert adm_md_count(described) == (CELEBA64_PARAMS, CELEBA64_TENSORS)
    n64, t64 = adm_md_count(PRESETS["gd-64-cond"])
    assert (n64 - CELEBA64_PARAMS, t64 - CELEBA64_TENSORS) == (1000 * 4 * 192, 1)  # less the label embedding
    parsed = parse_flags(CELEBA64)
    p = parsed.preset
    assert p.name == FLAGS_NAME and not adm_flags.matching_presets(p)
    assert count_parameters(p) == CELEBA64_PARAMS and len(layout(p)) == CELEBA64_TENSORS
    assert (p.new_attention_order, p.num_classes, p.schedule, p.T, p.rescale_timesteps, adm.variance_type(p)) == \
        (True, 0, "cosine", 1000, False, "learned_range")
    with torch.device("meta"):
        assert sum(v.numel() for v in adm.build_unet2d(p).state_dict().values()) == CELEBA64_PARAMS


def _import(*args):
    return main(["import-adm", *args])


def test_celeba64_tiny_checkpoint_imports_by_flags_and_samples(tmp_path, capsys):
    """The CelebA-64 flags at 32 channels (heads of 32, so that the widths 32..128 divide; ADM refuses 64-channel
    heads on 96 channels) import a random checkpoint of that layout, built here from a reference preset, not
    from the flags: the run equals the reference ADM forward, records the flags, and samples."""
    from adm_reference import unet_forward

    from core.nets.models import load_diffusion

    ref = tiny(PRESETS["gd-64-cond"], model_channels=32, num_head_channels=32, num_classes=0)
    state = _state(ref, 11)
    torch.save(state, tmp_path / "celeba.pt")
    flags = CELEBA64.replace("--num_channels 192", "--num_channels 32").replace("--num_head_channels 64",
                                                                                "--num_head_channels 32")
    run = tmp_path / "run"
    assert _import("--flags", flags + " --timestep_respacing 250", "--checkpoint", str(tmp_path / "celeba.pt"),
                   "--out", str(run)) == 0
    err = capsys.readouterr().err
    assert "a layout no preset has, 64px" in err and "--timestep_respacing '250' recorded" in err
    cfg = json.loads((run / "model.json").read_text())
    assert cfg["adm_preset"] == FLAGS_NAME and cfg["adm_flags"]["values"]["timestep_respacing"] == "250"
    assert cfg["adm_flags"]["codebase"] == "guided-diffusion" and "use_fp16" in cfg["adm_flags"]["given"]
    m = load_diffusion(run)
    assert (m.schedule.name, m.schedule.T, m.variance_type, m.timestep_scale, m.num_classes) == \
        ("cosine", 1000, "learned_range", 1.0, 0)
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 3, 64, 64, generator=g), torch.tensor([5, 990])
    with torch.no_grad():
        out, want = m.predict(x, t, precision="fp32"), unet_forward(ref, state, x, t)
    assert torch.allclose(out.eps, want[:, :3], atol=1e-4) and torch.allclose(out.variance_values, want[:, 3:], atol=1e-4)
    assert main(["sample", "--model", str(run), "--n", "2", "--steps", "3", "--sampler", "ddpm",
                 "--out", str(tmp_path / "s.npz")]) == 0
    assert np.load(tmp_path / "s.npz")["images"].shape == (2, 64, 64, 3)


def _same_runs(a, b):
    ja, jb = (json.loads((r / "model.json").read_text()) for r in (a, b))
    assert ja.pop("adm_flags", None) is None and jb.pop("adm_flags")
    assert ja == jb  # the same UNet config, schedule, variance, timestep scale, heads, weights' sha256
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("name,codebase,flags,small", [
    ("gd-lsun-bedroom", "guided", LSUN_GD.replace("--image_size 256", "--image_size 32 --channel_mult 1,1,2")
     .replace("--num_channels 256", "--num_channels 32").replace("--num_head_channels 64", "--num_head_channels 32"),
     dict(image_size=32, model_channels=32, channel_mult=(1, 1, 2), num_head_channels=32)),
    ("id-cifar10", "improved", CIFAR10_ID.replace("--num_channels 128", "--num_channels 32")
     .replace("--num_res_blocks 3", "--num_res_blocks 1"), dict(model_channels=32, num_res_blocks=1)),
])
def test_flags_import_equals_preset_import(tmp_path, monkeypatch, capsys, name, codebase, flags, small):
    """A random checkpoint imported with `--flags` (the README's, at small widths) and with `--preset` (the same
    preset at those widths) gives the same run folder: config, schedule, variance, timestep scale and weights."""
    p = tiny(PRESETS[name], **small)
    monkeypatch.setitem(adm.PRESETS, name, p)
    torch.save(_state(p, 5), tmp_path / "m.pt")
    assert _import("--preset", name, "--checkpoint", str(tmp_path / "m.pt"), "--out", str(tmp_path / "a")) == 0
    assert _import("--codebase", codebase, "--flags", flags, "--checkpoint", str(tmp_path / "m.pt"),
                   "--out", str(tmp_path / "b")) == 0
    assert f"the model of preset {name}" in capsys.readouterr().err
    _same_runs(tmp_path / "a", tmp_path / "b")


def test_flags_import_what_no_preset_covers(tmp_path, capsys):
    """improved-diffusion flags for a model no release has (learn_sigma False, so ADM's fixed large variance;
    rescaled timesteps at T = 100): imported, the run sees t * 1000 / T and equals the reference forward."""
    from adm_reference import unet_forward

    from core.nets.models import load_diffusion

    flags = "--image_size 32 --num_channels 32 --num_res_blocks 1 --diffusion_steps 100 --noise_schedule cosine"
    p = parse_flags(flags, "diffusion", "improved").preset
    assert p.name == FLAGS_NAME and (p.channel_mult, p.attention_ds, p.out_channels) == ((1, 2, 2, 2), {2, 4}, 3)
    assert adm.variance_type(parse_flags(flags + " --sigma_small True", "diffusion", "improved").preset) == "fixed_small"
    state = _state(p, 6)
    torch.save(state, tmp_path / "m.pt")
    assert _import("--codebase", "improved", "--flags", flags, "--checkpoint", str(tmp_path / "m.pt"),
                   "--out", str(tmp_path / "run")) == 0
    m = load_diffusion(tmp_path / "run")
    assert (m.variance_type, m.timestep_scale, m.schedule.T) == ("fixed_large", 10.0, 100)
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6)), torch.tensor([0, 99])
    with torch.no_grad():
        assert torch.allclose(m.predict(x, t, precision="fp32").eps, unet_forward(p, state, x, t.float() * 10), atol=1e-4)
    assert main(["sample", "--model", str(tmp_path / "run"), "--n", "1", "--steps", "2", "--sampler", "ddpm",
                 "--out", str(tmp_path / "s.npz")]) == 0


def test_classifier_flags_import_equals_the_preset_path(tmp_path, capsys):
    """import-adm-classifier --flags (guided-diffusion's classifier defaults) on a small classifier equals
    import_classifier with the same layout written as a preset; the flags are kept in classifier.json."""
    from core.nets.adm_encoder import import_classifier

    flags = "--image_size 64 --classifier_width 32 --classifier_depth 1 --classifier_attention_resolutions 8"
    p = tiny(PRESETS["gd-64-classifier"], model_channels=32, num_res_blocks=1, attention_resolutions=(8,))
    torch.save(_state(p, 8), tmp_path / "c.pt")
    import_classifier(tmp_path / "c.pt", p, tmp_path / "a")
    assert main(["import-adm-classifier", "--flags", flags, "--checkpoint", str(tmp_path / "c.pt"),
                 "--out", str(tmp_path / "b")]) == 0
    assert "a layout no preset has, 64px" in capsys.readouterr().err
    ca, cb = (json.loads((tmp_path / d / "classifier.json").read_text()) for d in ("a", "b"))
    assert cb.pop("adm_flags")["values"]["classifier_pool"] == "attention"
    own = ("name", "source", "published_params")
    assert {k: v for k, v in ca["adm"].items() if k not in own} == {k: v for k, v in cb["adm"].items() if k not in own}
    assert ca["weights_sha256"] == cb["weights_sha256"]
    # the minority head's own flags describe mc-lsun-head, which needs its trunk
    assert main(["import-adm-classifier", "--flags", PUBLISHED["mc-lsun-head"][1], "--checkpoint",
                 str(tmp_path / "c.pt"), "--out", str(tmp_path / "h")]) == 2
    assert "minority head without its trunk" in capsys.readouterr().err


BAD = [  # (command, codebase or None, flags, the one line's text)
    ("import-adm", None, "--image_size 64 --foo 1", "unknown flag --foo"),
    ("import-adm", None, "--image_size 64 --use_ddim True", "unknown flag --use_ddim"),
    ("import-adm", None, "--image_size 64 --num_channels", "--num_channels has no value"),
    ("import-adm", None, "--image_size 64 --num_channels --learn_sigma True", "--num_channels has no value"),
    ("import-adm", None, "--image_size sixty-four", "--image_size 'sixty-four': expected an integer"),
    ("import-adm", None, "--learn_sigma maybe", "--learn_sigma 'maybe': expected a boolean"),
    ("import-adm", None, "--dropout nan", "--dropout 'nan': expected a finite number"),
    ("import-adm", None, "image_size 64", "expected --NAME VALUE, got 'image_size'"),
    ("import-adm", None, "--image_size 64 'open", "cannot be split into words"),
    ("import-adm", None, " ", "--flags: empty"),
    ("import-adm", None, "--image_size 64 --image_size 256", "--image_size given twice with different values"),
    ("import-adm", None, "--attention_resolutions 16,x", "--attention_resolutions '16,x': expected positive integers"),
    ("import-adm", None, "--channel_mult 1,0.5", "--channel_mult '1,0.5': expected positive integers"),
    ("import-adm", None, "--predict_xstart True", "--predict_xstart True is not supported"),
    ("import-adm", None, "--noise_schedule sqrt", "--noise_schedule 'sqrt': ADM knows linear and cosine"),
    ("import-adm", None, "--diffusion_steps 10", "--diffusion_steps 10: too few"),
    ("import-adm", None, "--image_size 48", "--image_size 48: guided-diffusion has no default channel_mult"),
    ("import-adm", None, "--image_size 36 --channel_mult 1,2,2,2", "--image_size 36 cannot be halved 3 times"),
    ("import-adm", None, "--num_channels 48", "48 channels, not a positive multiple of 32"),
    ("import-adm", None, "--num_channels 32 --num_head_channels 64 --attention_resolutions 16",
     "attention over 96 channels cannot have heads of 64 channels"),
    ("import-adm", None, "--num_heads 3", "cannot be split into --num_heads 3"),
    ("import-adm", None, "--num_heads_upsample 2", "--num_heads_upsample 2 differs from --num_heads 4"),
    ("import-adm", None, "--timestep_respacing ddimx", "expected ddimN"),
    ("import-adm", None, "--timestep_respacing ddim999", "cannot make exactly 999 steps"),
    ("import-adm", None, "--timestep_respacing 10,600", "cannot divide a section of 500 steps into 600"),
    ("import-adm", None, "--sigma_small True", "--sigma_small is not one of guided-diffusion's flags"),
    ("import-adm", None, "--classifier_depth 4", "--classifier_depth is a classifier flag"),
    ("import-adm", "improved", "--resblock_updown True", "--resblock_updown is not one of improved-diffusion's"),
    ("import-adm", "improved", "--image_size 128", "--image_size 128: improved-diffusion has no default channel_mult"),
    ("import-adm-classifier", None, "--classifier_pool adaptive", "--classifier_pool adaptive is not supported"),
    ("import-adm-classifier", None, "--classifier_pool max", "--classifier_pool 'max': ADM's pools are"),
    ("import-adm-classifier", None, "--image_size 32", "--image_size 32: guided-diffusion's classifier has no"),
    ("import-adm-classifier", None, "--classifier_width 32", "attention over 96 channels cannot have heads of 64"),
    ("import-adm-classifier", None, "--num_channels 64", "--num_channels is a diffusion-model flag"),
]


def test_bad_flags_are_one_line_naming_the_flag_and_write_nothing(tmp_path, capsys):
    import warnings

    torch.save({"x": torch.zeros(1)}, tmp_path / "m.pt")
    out = tmp_path / "out"
    cases = BAD + [("import-adm", None, None, "exactly one"),
                   ("import-adm-classifier", "--preset gd-64-classifier", PUBLISHED["gd-64-classifier"][1],
                    "exactly one")]
    for command, codebase, flags, part in cases:
        args = [command, "--checkpoint", str(tmp_path / "m.pt"), "--out", str(out)]
        if codebase and codebase.startswith("--preset"):
            args += codebase.split()
        elif codebase:
            args += ["--codebase", codebase]
        if flags is not None:
            args.append(f"--flags={flags}")
        capsys.readouterr()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            code = main(args)
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and part in lines[0], (flags, lines)
        assert lines[0].startswith("error: "), lines
        assert not out.exists()
    assert _import("--preset", "gd-64-cond", "--codebase", "guided", "--checkpoint", "x", "--out", str(out)) == 2
    assert "--codebase applies to --flags only" in capsys.readouterr().err
    # a flags string whose layout is not the file's: the usual layout refusal, naming --flags
    assert _import("--flags", "--image_size 64 --num_channels 32", "--checkpoint", str(tmp_path / "m.pt"),
                   "--out", str(out)) == 2
    assert "not the layout --flags describe (diffusion): missing key" in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
