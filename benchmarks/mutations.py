"""Issue 24.5: prove that the guards can fail. Each mutation below breaks one claim on purpose in a temporary
copy of the project (tracked and untracked files, assets included) and runs the tests that guard that claim;
a mutation is *caught* when pytest reports failing tests (exit 1). A baseline run of every guard on the
unmutated copy must pass first, so a catch is the mutation's doing.

    python benchmarks/mutations.py [--only NAME ...] [--out docs/results/mutations.md]

Writes a markdown table (and a .json beside it) with each mutation, the tests run, the verdict, the first
failing test and the seconds taken. Exit code 0 when every mutation is caught, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the project root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple  # pytest node ids or files
    why: str


MUTATIONS = (
    # the list
    Mutation("adm-groupnorm-eps-1e-6", "core/nets/adm.py", "norm_eps=1e-5", "norm_eps=1e-6",
             ("tests/test_adm.py",), "ADM's GroupNorm eps is 1e-5 (ADM.md); 1e-6 moves outputs by ~5e-5"),
    Mutation("guidance-sign-flipped", "core/maths/guidance.py", "        return self.scale * grad_log(log_p, x_t)",
             "        return -self.scale * grad_log(log_p, x_t)",
             ("tests/test_claims.py::test_guidance_at_the_rarest_class_reaches_most_of_the_claimed_effect",
              "tests/test_closed_forms.py"), "Eq. 8 adds +w grad log p(l | x_t)"),
    Mutation("guidance-scale-x0.2", "core/maths/guidance.py", "        return self.scale * grad_log(log_p, x_t)",
             "        return 0.2 * self.scale * grad_log(log_p, x_t)",
             ("tests/test_claims.py::test_guidance_at_the_rarest_class_reaches_most_of_the_claimed_effect",
              "tests/test_closed_forms.py"), "a fifth of the guidance must not pass for the claimed effect"),
    Mutation("score-timestep-swapped", "core/maths/score.py",
             "t = torch.full((x0.shape[0],), settings.t, dtype=torch.long",
             "t = torch.full((x0.shape[0],), model.schedule.T - 1 - settings.t, dtype=torch.long",
             ("tests/test_claims.py::test_stored_scores_are_what_the_code_computes",), "Eq. 7 at the manifest's t"),
    Mutation("score-distance-swapped", "core/maths/score.py", '    if name == "l2":\n        return l2_distance',
             '    if name == "l2":\n        return l1_distance',
             ("tests/test_claims.py::test_stored_scores_are_what_the_code_computes", "tests/test_score_categorize.py"),
             "the faces bundle's score is l2 (Corollary 1 too)"),
    Mutation("thresholds-shifted-one-class", "core/maths/categorize.py",
             "np.quantile(scores, np.arange(1, num_classes + 1) / num_classes)",
             "np.quantile(scores, np.arange(0, num_classes) / num_classes)",
             ("tests/test_claims.py::test_classes_are_the_quantile_bins_of_the_stored_scores",
              "tests/test_score_categorize.py"), "L quantile bins, q[j-1] < s <= q[j] (official binning)"),
    Mutation("learned-variance-clamped", "core/maths/sampling.py", "        frac = (v + 1) / 2",
             "        frac = ((v + 1) / 2).clamp(0, 1)",
             ("tests/test_closed_forms.py::test_learned_range_interpolation_is_not_clamped",
              "tests/test_reference_parity.py"), "ADM does not clamp frac = (v + 1) / 2"),
    Mutation("near-copy-5th-percentile", "core/evaluation/neighbours.py", "NEAR_COPY_PERCENTILE = 1.0",
             "NEAR_COPY_PERCENTILE = 5.0", ("tests/test_neighbours.py",), "the rule is the 1st percentile"),
    Mutation("classifier-timestep-zeroed", "core/nets/models.py",
             "emb = self.time_embed(timestep_embedding(t, self.cfg.base_channels))",
             "emb = self.time_embed(timestep_embedding(t * 0, self.cfg.base_channels))",
             ("tests/test_claims.py::test_the_classifier_reads_the_timestep",), "p_psi(l | x_t, t) reads t"),
    # our own (the ADM ones found by the review of issue 24.6)
    Mutation("adm-classifier-groupnorm-eps-1.1e-5", "core/nets/adm_encoder.py",
             "self.bias.to(w), self.eps).to(x.dtype)", "self.bias.to(w), 1.1e-5).to(x.dtype)",
             ("tests/test_adm.py",), "the classifier's GroupNorm32 eps is 1e-5; a 10 % change must show"),
    Mutation("adm-attention-scale-1e-4-off", "core/nets/adm_encoder.py", "    scale = d ** -0.25\n",
             "    scale = d ** -0.25 * 1.0001\n", ("tests/test_adm.py",), "QKV attention scales q and k by d^-1/4"),
    Mutation("adm-layout-pool-token-dropped", "core/nets/adm.py", "(ch, side * side + 1)", "(ch, side * side)",
             ("tests/test_adm.py",), "exact parameter counts from the architecture"),
    Mutation("ddim-guidance-factor", "core/maths/sampling.py",
             "x0_hat = x0_hat + ((1 - abar_t) / abar_t ** 0.5) * g",
             "x0_hat = x0_hat + ((1 - abar_t) ** 0.5) * g",
             ("tests/test_adm.py", "tests/test_reference_parity.py"), "ADM condition_score's x0_hat shift"),
    Mutation("tweedie-unclipped", "core/maths/schedule.py", "return x0_hat.clamp(-1, 1) if clip else x0_hat",
             "return x0_hat", ("tests/test_claims.py::test_stored_scores_are_what_the_code_computes",),
             "Eq. 6's x0_hat is clipped to [-1, 1] for the score (official code)"),
    Mutation("score-draws-misaveraged", "core/maths/score.py", "    return total / settings.draws",
             "    return total / (settings.draws + 1)",
             ("tests/test_claims.py::test_stored_scores_are_what_the_code_computes",), "Eq. 7 averages the draws"),
    Mutation("bundle-symlinks-followed", "core/bundles/manifest.py", "st = path.lstat()", "st = path.stat()",
             ("tests/test_bundle_trust.py",), "a bundle file may not be a symlink"),
    Mutation("manifest-draws-unbounded", "core/bundles/manifest.py", '"score.draws": (1, 100)',
             '"score.draws": (1, 10 ** 12)', ("tests/test_bundle_trust.py",), "score.draws within [1, 100]"),
    Mutation("commit-without-atomic-swap", "core/nets/checkpoint.py",
             '    if not sys.platform.startswith("linux"):\n        return False',
             '    if True:\n        return False',
             ("tests/test_checkpoint.py::test_a_build_killed_during_the_final_move_always_leaves_a_complete_bundle",),
             "a kill at the final move keeps a complete bundle"),
    Mutation("near-copy-duplicates-counted", "core/evaluation/neighbours.py",
             "distinct = np.unique(real, axis=0)", "distinct = real", ("tests/test_neighbours.py",),
             "duplicate real images must not switch the near-copy rule off"),
)


def copy_project(dst: Path) -> None:
    """Tracked and untracked (not ignored) files of the project into ``dst``."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def run_tests(copy: Path, tests: tuple, timeout: int) -> tuple[int, str, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(copy)}
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], cwd=copy,
                           env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired:
        rc, out = -1, "timed out"
    return rc, out, time.perf_counter() - t0


def first_failure(out: str) -> str:
    m = re.search(r"^FAILED (\S+)", out, re.M)
    return m.group(1) if m else (out.strip().splitlines() or ["?"])[-1][:120]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--only", nargs="*", default=None, help="run only these mutations (by name)")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "mutations.md"))
    p.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    a = p.parse_args(argv)
    chosen = [m for m in MUTATIONS if a.only is None or m.name in a.only]
    rows, all_caught = [], True
    with tempfile.TemporaryDirectory(prefix="mutations-") as tmp:
        copy = Path(tmp) / "project"
        copy_project(copy)
        guards = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        rc, out, sec = run_tests(copy, guards, a.timeout)
        print(f"baseline: {len(guards)} guard(s), exit {rc}, {sec:.0f} s", flush=True)
        if rc != 0:
            print(out[-3000:])
            print("the guards fail on the unmutated code: fix that first")
            return 2
        for m in chosen:
            path = copy / m.file
            text = path.read_text()
            count = text.count(m.old)
            if count != 1:
                rows.append({"mutation": m.name, "verdict": f"NOT APPLIED ({count} matches)", "tests": m.tests})
                all_caught = False
                print(f"{m.name}: the text to mutate occurs {count} times in {m.file}", flush=True)
                continue
            path.write_text(text.replace(m.old, m.new))
            try:
                rc, out, sec = run_tests(copy, m.tests, a.timeout)
            finally:
                path.write_text(text)
            caught = rc == 1
            all_caught &= caught
            row = {"mutation": m.name, "file": m.file, "change": f"{m.old.strip()} -> {m.new.strip()}", "why": m.why,
                   "tests": list(m.tests), "exit": rc, "verdict": "caught" if caught else "MISSED",
                   "first_failure": first_failure(out) if caught else (out.strip().splitlines() or [""])[-1][:120],
                   "seconds": round(sec, 1)}
            rows.append(row)
            print(f"{m.name}: {row['verdict']} ({row['first_failure']}, {sec:.0f} s)", flush=True)
    lines = ["| mutation | file | breaks | verdict | first failing test | s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mutation']} | `{r.get('file', '')}` | {r.get('why', '')} | {r['verdict']} | "
                     f"`{r.get('first_failure', '')}` | {r.get('seconds', '')} |")
    caught = sum(r["verdict"] == "caught" for r in rows)
    lines.append(f"\n{caught} of {len(rows)} mutations caught.")
    out_path = Path(a.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("\n".join(lines) + "\n")
    out_path.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))
    return 0 if all_caught else 1


if __name__ == "__main__":
    raise SystemExit(main())
