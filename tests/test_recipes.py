"""Issue 25 §3: the recipes in docs/recipes/ cannot rot.

For every recipe (one markdown file per paper benchmark, each with ONE ```bash block) the block is read as bash
would read it: backslash continuations joined, ``VAR=value`` assignments (shlex), ``$VAR`` / ``${VAR}``
substituted (string.Template), then every ``python -m core ...`` line is run in-process through
``core.cli.main`` in order, and must return 0; a failing command fails the test with the command shown.
Besides those lines a recipe may hold ``for V in $(seq A B); do ... done`` loops and ``python -c '...' ARGS``
lines (run as a subprocess, globs expanded); any other line fails the test, so nothing in a recipe goes
unchecked.

What the test changes, and nothing else:

- the scale knobs and file paths (``SCALE_KNOBS`` below: N, STEPS, DRAWS, CLF_STEPS, CLF_BATCH, CLF_WIDTH, BATCH,
  BASELINE, ...) take tiny values and every path points into ``tmp_path`` (random images at the model's size,
  one sub-folder per class for the class-conditional models); ``L`` (the number of minority classes) becomes 2
  and ``TARGET`` keeps its form (one class or a range) inside 0..1, since L = 100 classes need 100 scored
  images; ``N`` is 6 (``PER_CLASS`` 3 for 2 classes) and the real set 22 images, the fewest ``evaluate`` takes;
- ``DISTANCE`` is ``l2`` and ``EVAL_EXTRA`` selects the ``classifier`` feature space of a tiny random classifier
  for both of ``evaluate --protocol paper``'s spaces: LPIPS, ResNet-50 and Inception weights are not available
  offline, and a Fréchet distance over 2048 random-network features costs seconds per set on two cores;
- every ``--flags`` string (MODEL_FLAGS, the classifier's flags) is the recipe's own with only the widths shrunk:
  ``--num_channels 32``, ``--num_head_channels 32`` where given, ``--classifier_width 32``; the checkpoint the
  import reads is a random state dict of exactly the layout ``core.nets.adm_flags.parse_flags`` / ``layout`` give
  for that shrunk string, so image size, levels, attention, schedule, T, class conditioning and variance are
  the recipe's;
- documented override: the official LSUN minority head (``mc_lsun.pt``) only fits the full 128-channel
  ``gd-256-classifier`` trunk, whose guided 256x256 steps cost minutes on two cores; the test registers the
  32-channel trunk under that preset's name and changes nothing else (the head keeps its own layout except its
  input width, which follows the trunk's 4 x 32 = 128 channels), via ``monkeypatch`` of ``core.nets.adm.PRESETS``.

Everything else is the recipe's: the image sizes, the schedules, ``--t``, the classifier's depth and channel
multipliers, ``--minority-class`` forms, ``--scale``, the sampler, ``--precision`` and ``--protocol paper``.

A separate test (no network is run) checks each recipe's own values against the paper's Table 2 and Section C,
copied into ``PAPER`` below from the paper (not from the code under test), by parsing every command with the
CLI's own parser.
"""
from __future__ import annotations

import argparse
import glob
import json
import re
import shlex
import string
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from core.cli import build_parser, main
from core.nets import adm, adm_flags

ROOT = Path(__file__).resolve().parent.parent
RECIPE_DIR = ROOT / "docs" / "recipes"
BENCHMARKS = ("celeba64.md", "cifar10.md", "lsun_bedroom256.md", "imagenet64.md", "imagenet256.md")

# the paper (ICLR 2024), Table 2 and Section C: per benchmark the score's t (0.9T cosine, 0.6T linear), L, the
# target l, the scale w, the quality baseline (most unique real samples by AvgkNN), 50K generated samples,
# NFE 250; the classifier's width, channel multipliers, depth, iterations, batch, learning rate, weight decay
PAPER = {
    "celeba64.md": dict(preset=None, t=0.9, L=100, target="90-99", w=4.0, baseline=10000, per_class=False,
                        clf=dict(base_channels=64, channel_mult="1,2,3,4", res_blocks=2, steps=20000,
                                 batch_size=256, lr=3e-4, weight_decay=0.05), precision="fp16"),
    "cifar10.md": dict(preset="id-cifar10", t=0.9, L=100, target="85-99", w=8.0, baseline=5000, per_class=False,
                       clf=dict(base_channels=32, channel_mult="1,2,2,4", res_blocks=2, steps=12000,
                                batch_size=128, lr=3e-4, weight_decay=0.05), precision="fp32"),
    "lsun_bedroom256.md": dict(preset="gd-lsun-bedroom", t=0.6, L=100, target="99", w=3.5, baseline=50000,
                               per_class=False, clf=None, precision="fp16"),
    "imagenet64.md": dict(preset="gd-64-cond", t=0.9, L=25, target="24", w=2.5, baseline=50000, per_class=True,
                          clf=dict(base_channels=128, channel_mult="1,2,3,4", res_blocks=4, steps=60000,
                                   batch_size=1024, lr=6e-4, weight_decay=0.2), precision="fp16"),
    "imagenet256.md": dict(preset="gd-256-cond", t=0.6, L=25, target="24", w=2.5, baseline=50000, per_class=True,
                           clf=dict(base_channels=128, channel_mult="1,1,2,2,4,4", res_blocks=2, steps=60000,
                                    batch_size=1024, lr=6e-4, weight_decay=0.2), precision="fp16"),
}

# the recipe variables the test sets to tiny values (anything else a recipe defines must be in KEPT below, so
# that a new knob cannot silently make this test slow)
SCALE_KNOBS = {"N": "6", "PER_CLASS": "3", "FIRST_CLASS": "0", "LAST_CLASS": "1", "STEPS": "2", "DRAWS": "1",
               "CLF_STEPS": "2", "CLF_BATCH": "2", "CLF_WIDTH": "8", "BATCH": "6", "BASELINE": "6",
               "DISTANCE": "l2"}
KEPT = {"MODEL_FLAGS", "DIFFUSION_FLAGS", "FE_FLAGS", "PRECISION", "L", "TARGET", "EVAL_EXTRA", "WORK"}
WIDTH = 32  # the shrunk width of every ADM network (GroupNorm's 32 groups)
GEN_MIN, REAL_MIN = 6, 21  # evaluate needs k_pr + 1 generated and k_lof + 1 real samples


# ---- reading a recipe as bash would -----------------------------------------------------------------
@dataclass
class Stmt:
    kind: str  # assign | core | py | for
    text: str  # the logical line as written
    name: str = ""  # assign: the variable; for: the loop variable
    bounds: tuple = ()  # for: (A, B) of $(seq A B), unsubstituted
    body: list = field(default_factory=list)


def bash_block(path: Path) -> str:
    blocks = re.findall(r"^```bash\n(.*?)^```", path.read_text(encoding="utf-8"), re.S | re.M)
    assert len(blocks) == 1, f"{path.name}: expected exactly one ```bash block, found {len(blocks)}"
    return blocks[0]


def logical_lines(block: str) -> list:
    out, cur = [], ""
    for line in block.splitlines():
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        cur += line
        if cur.strip() and not cur.strip().startswith("#"):
            out.append(cur.strip())
        cur = ""
    assert not cur.strip(), f"a continuation runs off the end of the block: {cur!r}"
    return out


_ASSIGN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
_FOR = re.compile(r"^for ([A-Za-z_][A-Za-z0-9_]*) in \$\(seq (\S+) (\S+)\); do$")


def statements(block: str) -> list:
    top: list = []
    stack = [top]
    for line in logical_lines(block):
        if m := _FOR.match(line):
            st = Stmt("for", line, m.group(1), (m.group(2), m.group(3)))
            stack[-1].append(st)
            stack.append(st.body)
        elif line == "done":
            assert len(stack) > 1, "'done' without 'for'"
            stack.pop()
        elif m := _ASSIGN.match(line):
            stack[-1].append(Stmt("assign", line, m.group(1)))
        elif line.startswith("python -m core "):
            stack[-1].append(Stmt("core", line))
        elif line.startswith("python -c "):
            stack[-1].append(Stmt("py", line))
        else:
            raise AssertionError(f"a line this test cannot check (only VAR=..., python -m core ..., python -c "
                                 f"..., for V in $(seq A B); do ... done): {line!r}")
    assert len(stack) == 1, "'for' without 'done'"
    return top


def assigned_value(st: Stmt, env: dict) -> str:
    words = shlex.split(st.text.split("=", 1)[1], comments=True)
    assert len(words) <= 1, f"an assignment bash would split into a command: {st.text!r}"
    try:
        return string.Template(words[0] if words else "").substitute(env)
    except KeyError as e:
        raise AssertionError(f"undefined variable {e} in: {st.text}") from None


def expand(text: str, env: dict) -> list:
    """$VAR / ${VAR} substituted into the line as written, then split into words as bash would (an undefined
    variable is an error, not an empty string)."""
    try:
        return shlex.split(string.Template(text).substitute(env), comments=True)
    except KeyError as e:
        raise AssertionError(f"undefined variable {e} in: {text}") from None


def recipe_env(stmts: list) -> dict:
    """The recipe's own variable values (no override)."""
    env: dict = {}
    for st in stmts:
        if st.kind == "assign":
            env[st.name] = assigned_value(st, env)
    return env


def core_commands(stmts: list, env: dict) -> list:
    """Every core command's argv with the recipe's own values; a loop's body once per iteration."""
    out = []
    for st in stmts:
        if st.kind == "core":
            out.append(expand(st.text, env)[3:])
        elif st.kind == "for":
            lo, hi = (int(string.Template(b).substitute(env)) for b in st.bounds)
            for v in range(lo, hi + 1):
                out += core_commands(st.body, {**env, st.name: str(v)})
    return out


def recipes():
    return sorted(p for p in RECIPE_DIR.glob("*.md") if p.name != "README.md")


def test_one_recipe_per_paper_benchmark():
    assert [p.name for p in recipes()] == sorted(BENCHMARKS)


# ---- the recipes' own values against the paper -------------------------------------------------------
@pytest.mark.parametrize("name", BENCHMARKS)
def test_recipe_values_are_the_papers(name):
    stmts = statements(bash_block(RECIPE_DIR / name))
    env = recipe_env(stmts)
    paper = PAPER[name]
    unknown = set(env) - set(SCALE_KNOBS) - KEPT - path_variables(stmts)
    assert not unknown, f"{name}: variables this test does not know how to shrink or keep: {sorted(unknown)}"
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for argv in core_commands(stmts, env):  # every option spelled out (argparse would accept a prefix)
        options = {o for action in sub[argv[0]]._actions for o in action.option_strings}
        bad = [w for w in argv[1:] if w.startswith("--") and " " not in w and w.split("=")[0] not in options]
        assert not bad, f"{name}: {argv[0]} has no option {bad[0]} (abbreviated or misspelt)"
    cmds = [(argv[0], parser.parse_args(argv)) for argv in core_commands(stmts, env)]
    by = {}
    for cmd, a in cmds:
        by.setdefault(cmd, []).append(a)
    # the backbone: the release's layout (CelebA: the layout no preset has, pinned in tests/test_adm_flags.py)
    (imp,) = by["import-adm"]
    parsed = adm_flags.parse_flags(imp.flags, "diffusion", imp.codebase or "guided")
    if paper["preset"] is None:
        assert parsed.preset.name == adm.FLAGS_NAME and adm.count_parameters(parsed.preset) == 295_136_454
    else:  # the LSUN bedroom, cat and horse models share the 256x256 unconditional model's layout
        assert paper["preset"] in [q.name for q in adm_flags.matching_presets(parsed.preset)], parsed.preset.name
    want_t = 0.9 if parsed.preset.schedule == "cosine" else 0.6
    assert paper["t"] == want_t, "the paper: t = 0.9T for cosine models, 0.6T for linear ones"
    # the score of the real set
    (score,) = by["score"]
    assert (score.t, score.distance, score.draws) == (want_t, "lpips", 5)
    assert score.classes in (None, paper["L"]) and score.per_class == paper["per_class"]
    # the classifier
    if paper["clf"] is None:
        (ic,) = by["import-adm-classifier"]
        assert ic.minority_head and adm_flags.parse_flags(ic.flags, "classifier").preset.name == "gd-256-classifier"
        L = adm.PRESETS["mc-lsun-head"].out_channels
    else:
        (tc,) = by["train-classifier"]
        got = {k: getattr(tc, k) for k in paper["clf"]}
        assert got == paper["clf"], f"{name}: train-classifier {got} != Table 2 {paper['clf']}"
        assert (tc.classes, tc.per_class) == (paper["L"], paper["per_class"])
        L = tc.classes
    assert L == paper["L"]
    # sampling: minority guidance at the paper's l and w, and the standard sampler; ancestral, 250 steps
    guided = [a for a in by["sample"] if a.method in (None, "minority")]
    standard = [a for a in by["sample"] if a.method == "standard"]
    assert guided and standard and len(guided) == len(standard)
    for a in guided + standard:
        assert (a.sampler, a.steps, a.precision) == ("ddpm", 250, paper["precision"])
    for a in guided:
        assert (a.minority_class, a.scale) == (paper["target"], paper["w"]) and a.classifier
        assert max(int(v) for v in a.minority_class.split("-")) == L - 1, "the rarest class is L - 1"
    for group in (guided, standard):
        assert sum(a.n for a in group) == 50000
        if parsed.preset.num_classes:
            labels = [a.class_label for a in group]
            assert None not in labels and sorted(labels) == list(range(1000)), "each ImageNet class once"
    # the table row
    (ev,) = by["evaluate"]
    assert (ev.protocol, ev.baseline_top) == ("paper", paper["baseline"])
    assert [Path(g).stem for g in ev.generated] == ["standard", "guided"]
    assert env["EVAL_EXTRA"] == "", "the paper's feature spaces by default"


# ---- running a recipe on tiny random checkpoints --------------------------------------------------------
def path_variables(stmts: list) -> set:
    """Variables a recipe passes as --checkpoint, --minority-head, --data or --real: the files the user holds."""
    names = set()
    flat = [s for st in stmts for s in ([st] + st.body)]
    for st in flat:
        if st.kind == "core":
            names |= set(re.findall(r"--(?:checkpoint|minority-head|data|real) \$\{?(\w+)\}?", st.text))
    return names


def random_state(p, seed: int) -> dict:
    """Random weights of ``layout(p)``, scaled like an initialised network (norm scales near 1)."""
    g = torch.Generator().manual_seed(seed)
    s = {k: torch.randn(shape, generator=g) * (0.5 if len(shape) == 1 else 1 / np.sqrt(np.prod(shape[1:])))
         for k, shape in adm.layout(p).items()}
    for k in s:
        if k.endswith(("norm.weight", "in_layers.0.weight", "out_layers.0.weight", "out.0.weight")):
            s[k] = 1 + 0.1 * s[k]
    return s


def shrink(flags: str, kind: str) -> str:
    """The flags string with only the widths shrunk to WIDTH channels (added where the string relies on the
    codebase's default width)."""
    width = "--num_channels" if kind == "diffusion" else "--classifier_width"
    out = flags
    for flag in (width, "--num_head_channels"):
        pat = re.compile(rf"{flag}(?:=|\s+)(\S+)")
        if pat.search(out):
            if flag == "--num_head_channels" and pat.search(out).group(1) == "-1":
                continue
            out = pat.sub(f"{flag} {WIDTH}", out)
        elif flag == width:
            out += f" {width} {WIDTH}"
    return out


def write_images(folder: Path, n: int, size: int, classes: int, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(max(classes, 1)):
        sub = folder / f"n0{1440764 + c}" if classes else folder
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(sub / f"{i:03d}.png")


def tiny_target(target: str) -> str:
    """The recipe's TARGET in the same form (one class or a range A-B) inside 0..L-1 for L = 2."""
    return "0-1" if "-" in target else "1"


def run_core(argv: list, shown: str, capsys, timings: list) -> None:
    capsys.readouterr()
    t0 = time.perf_counter()
    try:
        rc = main(argv)
    except Exception as e:  # main turns user errors into exit codes; anything else is a crash
        pytest.fail(f"recipe command crashed ({type(e).__name__}: {e}):\n  {shown}", pytrace=False)
    timings.append((time.perf_counter() - t0, argv[0]))
    if rc != 0:
        err = capsys.readouterr().err.strip().splitlines()
        pytest.fail(f"recipe command failed (exit {rc}):\n  {shown}\n" + "\n".join(err[-5:]), pytrace=False)


def fake_checkpoints(argv: list, seed: int) -> list:
    """Before an import: write the random checkpoint(s) its --flags (shrunk) describe; returns the argv with the
    shrunk flags."""
    argv = list(argv)
    i = argv.index("--flags")
    kind = "diffusion" if argv[0] == "import-adm" else "classifier"
    argv[i + 1] = shrink(argv[i + 1], kind)
    codebase = argv[argv.index("--codebase") + 1] if "--codebase" in argv else "guided"
    p = adm_flags.parse_flags(argv[i + 1], kind, codebase).preset
    ckpt = Path(argv[argv.index("--checkpoint") + 1])
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_state(p, seed), ckpt)
    if "--minority-head" in argv:
        head = Path(argv[argv.index("--minority-head") + 1])
        torch.save(random_state(adm.PRESETS["mc-lsun-head"], seed + 1), head)
    return argv


@pytest.fixture
def one_thread():
    """One torch thread: these networks are too small to gain from two, and on a shared 2-core machine two
    threads that wait on each other made this file 2-4x slower (measured under a load average of 6-7: 65 s with
    one thread against 109-285 s with two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def small_lsun_trunk(monkeypatch):
    """The documented override: the 32-channel gd-256-classifier trunk under the preset's name, and the official
    head's layout with its input width following the trunk's (4 x 32 channels)."""
    trunk = adm.tiny(adm.PRESETS["gd-256-classifier"], model_channels=WIDTH)
    monkeypatch.setitem(adm.PRESETS, "gd-256-classifier", trunk)
    monkeypatch.setitem(adm.PRESETS, "mc-lsun-head", adm.tiny(adm.PRESETS["mc-lsun-head"],
                                                              in_channels=int(trunk.channel_mult[-1] * WIDTH)))


def execute(stmts: list, env: dict, overrides: dict, tmp: Path, capsys, timings: list, seed: list) -> None:
    for st in stmts:
        if st.kind == "assign":
            env[st.name] = overrides[st.name] if st.name in overrides else assigned_value(st, env)
        elif st.kind == "for":
            lo, hi = (int(string.Template(b).substitute(env)) for b in st.bounds)
            for v in range(lo, hi + 1):
                execute(st.body, {**env, st.name: str(v)}, overrides, tmp, capsys, timings, seed)
        elif st.kind == "core":
            argv = expand(st.text, env)[3:]
            if argv[0] in ("import-adm", "import-adm-classifier"):
                seed[0] += 2
                argv = fake_checkpoints(argv, seed[0])
            run_core(argv, "python -m core " + shlex.join(argv), capsys, timings)
        else:  # python -c CODE ARGS: globs expanded as bash would
            words = expand(st.text, env)
            args = [m for w in words[3:] for m in (sorted(glob.glob(w)) if any(c in w for c in "*?[") else [w])]
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-c", words[2], *args], capture_output=True, text=True, cwd=tmp)
            timings.append((time.perf_counter() - t0, "python -c"))
            if r.returncode != 0:
                pytest.fail(f"recipe line failed (exit {r.returncode}):\n  {shlex.join(words[:2])} ... "
                            f"{shlex.join(args)}\n{r.stderr[-800:]}", pytrace=False)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_recipe_runs_on_tiny_random_checkpoints(name, tmp_path, capsys, small_lsun_trunk, one_thread):
    from core.nets.models import ClassifierConfig, NoiseConditionedClassifier, save_classifier

    stmts = statements(bash_block(RECIPE_DIR / name))
    own = recipe_env(stmts)
    (imp,) = [a for a in core_commands(stmts, own) if a[0] == "import-adm"]
    codebase = imp[imp.index("--codebase") + 1] if "--codebase" in imp else "guided"
    model = adm_flags.parse_flags(imp[imp.index("--flags") + 1], "diffusion", codebase).preset
    classes = 2 if model.num_classes else 0
    # the files the user holds: checkpoints (written before each import from its flags), data, real images
    overrides = dict(SCALE_KNOBS, WORK=str(tmp_path / "work"))
    for var in path_variables(stmts):
        overrides[var] = str(tmp_path / "in" / var.lower())
    uses = {v: {a for a in re.findall(rf"--(data|real) \$\{{?{v}\}}?", bash_block(RECIPE_DIR / name))}
            for v in path_variables(stmts)}
    for var, flags_of in uses.items():
        if "data" in flags_of:
            write_images(Path(overrides[var]), 3 if classes else 4, model.image_size, classes, seed=1)
        elif "real" in flags_of:
            write_images(Path(overrides[var]), REAL_MIN // max(classes, 1) + 1, model.image_size, classes, seed=2)
    if "L" in own:
        overrides.update(L="2", TARGET=tiny_target(own["TARGET"]))
    # the offline feature space of evaluate: a tiny random classifier of ours for both spaces, halving down to
    # 2x2 so that its pooled (8) and spatial (7 x 2 x 2) features keep the Fréchet distances cheap
    evalclf = tmp_path / "evalclf"
    torch.manual_seed(0)
    levels = (1,) * int(np.log2(model.image_size))
    save_classifier(evalclf, NoiseConditionedClassifier(ClassifierConfig(
        image_size=model.image_size, channels=3, num_outputs=2, base_channels=8, channel_mult=levels)), [0.0, 1.0], {})
    overrides["EVAL_EXTRA"] = f"--density-features classifier --quality-features classifier --classifier {evalclf}"
    timings: list = []
    t0 = time.perf_counter()
    execute(stmts, {}, overrides, tmp_path, capsys, timings, [0])
    total = time.perf_counter() - t0
    reports = list((tmp_path / "work").rglob("report.json"))
    assert len(reports) == 1, f"the recipe's evaluate wrote {len(reports)} reports under $WORK"
    rows = {s["name"]: s for s in json.loads(reports[0].read_text())["sets"]}
    assert set(rows) == {"standard", "guided"} and all(r["n"] == GEN_MIN for r in rows.values())
    with capsys.disabled():
        slow = ", ".join(f"{c} {t:.1f}s" for t, c in sorted(timings, reverse=True)[:4])
        print(f"\n{name}: {total:.1f}s ({slow})")
