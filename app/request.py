"""What a visitor asks for, checked (issue 24: values arrive from the HTTP API as JSON): the app's vocabulary of
methods and samplers, the sliders' limits and defaults, ``GenerateRequest`` and its validation, the Browse tab's
orders and row filter. No gradio, no torch model: ``app.handlers`` re-exports these names."""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch

from core.errors import MinorityError

METHODS = ("minority guidance", "self-guided", "Boost-and-Skip", "standard")
# ours (ADM-exact) first, then diffusers' schedulers with guidance folded into eps (issue 26, core/maths/solvers.py)
SAMPLERS = {"DDIM": "ddim", "ancestral (DDPM)": "ddpm", "DPM-Solver++ 2M": "dpmpp-2m",
            "DPM-Solver++ 2M SDE": "dpmpp-2m-sde", "UniPC": "unipc", "Euler ancestral": "euler-a",
            "DDIM (diffusers)": "diffusers-ddim", "DDPM (diffusers)": "diffusers-ddpm"}
OWN_SAMPLERS = ("DDIM", "ancestral (DDPM)")  # the samplers self-guidance and Boost-and-Skip are defined for
LIMITS = {"steps": (5, 100), "n": (1, 16), "scale": (0.0, 10.0), "seed": (0, 2 ** 31 - 1), "gamma": (1.0, 5.0),
          "skip": (0, 10), "interval": (1, 10), "spread": (0, 10)}
DEFAULTS = {"steps": 25, "n": 16, "scale": 1.5, "seed": 0, "sampler": "DDIM", "method": "minority guidance",
            "gamma": 3.0, "skip": 3, "interval": 5, "spread": 0}


@dataclass(frozen=True)
class GenerateRequest:
    """One press of Generate: target class l in [0, L), scale w in [0, 10], and the sampler settings."""

    minority_class: int
    scale: float
    steps: int = DEFAULTS["steps"]
    n: int = DEFAULTS["n"]
    seed: int = DEFAULTS["seed"]
    sampler: str = DEFAULTS["sampler"]
    method: str = DEFAULTS["method"]
    gamma: float = DEFAULTS["gamma"]  # Boost-and-Skip: initial noise scale
    skip: int = DEFAULTS["skip"]  # Boost-and-Skip: steps skipped at the noisy end
    interval: int = DEFAULTS["interval"]  # self-guided: guide steps whose index is a multiple of k (scale w)
    spread: int = DEFAULTS["spread"]  # minority guidance: each image's l drawn uniformly from l - spread .. l

    def targets(self) -> torch.Tensor:
        """Each image's target class (n,) int64: l, or l ~ U{l - spread .. l} seeded by the request's seed
        (the paper's l ~ U{90..99}); the same draws as ``python -m core sample --minority-class A-B``."""
        from core.maths.guidance import minority_targets

        lo = self.minority_class - self.spread
        spec = f"{lo}-{self.minority_class}" if self.spread else str(self.minority_class)
        return minority_targets(spec, self.n, self.seed, self.minority_class + 1)

    def class_text(self) -> str:
        return f"{self.minority_class - self.spread}-{self.minority_class}" if self.spread else str(self.minority_class)

    def check(self, num_classes: int) -> "GenerateRequest":
        """The request with numbers coerced, or a MinorityError naming the field and the allowed values.
        Values arrive from the HTTP API as JSON, so the bounds Gradio checks are not enough: JSON ``true``
        passes them as 1, NaN passes every comparison, and 1.5 is not a seed. See ``number``."""
        if self.method not in METHODS:
            raise MinorityError(f"unknown method {clip_text(self.method)!r}; allowed: {', '.join(METHODS)}")
        if self.sampler not in SAMPLERS:
            raise MinorityError(f"unknown sampler {clip_text(self.sampler)!r}; allowed: {', '.join(SAMPLERS)}")
        if self.method in ("self-guided", "Boost-and-Skip") and self.sampler not in OWN_SAMPLERS:
            raise MinorityError(f"{self.method} is defined for the samplers {' and '.join(OWN_SAMPLERS)}, "
                                f"not for {self.sampler}")
        l = number("minority class l", self.minority_class, 0, num_classes - 1, whole=True)  # noqa: E741
        steps = number("steps", self.steps, *LIMITS["steps"], whole=True)
        return GenerateRequest(
            minority_class=l, scale=number("scale w", self.scale, *LIMITS["scale"]), steps=steps,
            n=number("number of images", self.n, *LIMITS["n"], whole=True),
            seed=number("seed", self.seed, *LIMITS["seed"], whole=True),
            sampler=self.sampler, method=self.method,
            gamma=number("gamma", self.gamma, *LIMITS["gamma"]),
            skip=number("skip", self.skip, 0, min(LIMITS["skip"][1], steps - 1), whole=True),
            interval=number("interval", self.interval, *LIMITS["interval"], whole=True),
            spread=number("range below l", self.spread, 0, min(LIMITS["spread"][1], l), whole=True))


def number(name: str, v, lo, hi, whole: bool = False):
    """``v`` as a float in [lo, hi] (an int when ``whole``), or a MinorityError naming the field ``name``:
    bools (JSON true) and non-numbers are refused, NaN and infinities fail the range, and a whole-number
    field takes integers or integral floats (7.0) only: 1.5 is refused, never rounded or truncated."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise MinorityError(f"{name} must be a number, got {clip_text(repr(v))}")
    try:
        x = float(v)
    except OverflowError:  # an int too large for a float
        x = float("inf")
    if not lo <= x <= hi:
        raise MinorityError(f"{name} must be in [{lo}, {hi}], got {clip_text(v)}")
    if whole and not x.is_integer():
        raise MinorityError(f"{name} must be a whole number in [{lo}, {hi}], got {v}")
    return int(x) if whole else x


ECHO_CHARS = 80  # user text quoted back in a message is cut to this many characters


def clip_text(text, limit: int = ECHO_CHARS) -> str:
    """``text`` (any value, as str) cut to ``limit`` characters with an ellipsis: a message never echoes a
    visitor's 100 KB string whole."""
    text = str(text)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def browse_orders(columns) -> list:
    """The Browse tab's orders: by minority score, then high / low first by each numeric metadata column."""
    return ["most unique first", "most common first"] + [f"{c}: {d} first" for c in columns for d in ("high", "low")]


FILTER_OPS = ("<=", ">=", "!=", "=", "<", ">")


def row_filter(metadata: dict, where: str, n: int) -> np.ndarray:
    """Rows (n,) bool matching every comma-separated condition ``column op number`` of ``where`` (ops: =, !=,
    <, <=, >, >=); an empty ``where`` matches all. MinorityError naming the columns for anything else."""
    keep = np.ones(n, bool)
    for part in (where or "").split(","):
        part = part.strip()
        if not part:
            continue
        op = next((o for o in FILTER_OPS if o in part), None)
        col, _, value = part.partition(op) if op else (part, "", "")
        col, value = col.strip(), value.strip()
        if op is None or col not in metadata:
            cols = ", ".join(metadata) or "none in this bundle"
            raise MinorityError(f"filter {clip_text(part)!r}: write column op number, e.g. "
                                f"{next(iter(metadata), 'x')} > 0; columns: {cols}")
        try:
            x = float(value)
        except ValueError:
            raise MinorityError(f"filter {clip_text(part)!r}: {clip_text(value)!r} is not a number") from None
        v = metadata[col]
        with np.errstate(invalid="ignore"):
            keep &= {"=": v == x, "!=": v != x, "<": v < x, "<=": v <= x, ">": v > x, ">=": v >= x}[op]
    return keep
