"""A bundle is untrusted input (issue 24): bundles are made to be shared, so every file a bundle names and
every value its manifest holds is checked before it is opened or used.

- ``member(root, name)``: a file of the bundle is one of ``BUNDLE_FILES``, named plainly (no folder, no ``..``,
  not absolute) and a regular file inside the bundle folder, not a symlink; checked with ``lstat`` before
  anything opens it.
- ``validate_manifest(manifest, source)``: the manifest's schema with bounds (types, ranges, L >= 2, L finite
  non-decreasing thresholds, draws and sizes within limits). A bad value is one ``CheckpointError`` line that
  names its key, raised before any value is used, so no value of a stranger's manifest reaches an allocation.
- ``check_text`` / ``check_column`` / ``check_rel_path``: text the app shows (names, column names, image
  paths) is printable, short, and of a known shape.

The manifest's sha256 sums tie the other files to it; they say nothing about the manifest itself, which is
why its values get bounds here.
"""
from __future__ import annotations

import math
import re
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from core.errors import CheckpointError
from core.maths.sampling import SAMPLERS

BUNDLE_FILES = ("model.json", "model.safetensors", "classifier.json", "classifier.safetensors",
                "real.safetensors", "real.csv")

LIMITS = {  # inclusive bounds of the manifest's numbers
    "num_classes": (2, 1000),
    "image_size": (8, 1024),
    "T": (2, 100_000),
    "score.draws": (1, 100),  # the shipped bundles use 12 and 20; each draw is one batch through the UNet
    "score.seed": (0, 2 ** 63 - 1),
    "dataset.n": (1, 10 ** 9),
    "app.steps": (1, 1000),  # sampler steps ``sample --bundle`` defaults to (and at most T)
}
SCHEDULES = ("linear", "cosine")
APP_SAMPLERS = SAMPLERS  # ours (ddim, ddpm) and diffusers' schedulers (issue 26)
TEXT_MAX = 120  # characters of a name the app shows
COLUMN = re.compile(r"[A-Za-z_][A-Za-z0-9_.%()-]{0,63}")  # a metadata column name (a Browse order, a filter key)
SHA256 = re.compile(r"[0-9a-f]{64}")


def member(root: Path, name: str) -> Path:
    """The path of bundle file ``name`` after checking it is a plain name of BUNDLE_FILES and a regular file
    directly inside ``root`` (``lstat``: a symlink is refused whatever it points at)."""
    if not isinstance(name, str) or name not in BUNDLE_FILES:
        raise CheckpointError(f"--bundle {root}: {name!r} is not a bundle file (allowed: {', '.join(BUNDLE_FILES)})")
    path = root / name
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise CheckpointError(f"--bundle {root}: missing file {name}") from None
    except OSError as e:
        raise CheckpointError(f"--bundle {root}: cannot read {name} ({e.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        raise CheckpointError(f"--bundle {root}: {name} is a symlink; a bundle's files must be regular files inside it")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"--bundle {root}: {name} is not a regular file")
    return path


def _fail(source: str, key: str, want: str, value: Any) -> CheckpointError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return CheckpointError(f"{source}: {key!r} must be {want}, got {shown}")


def _get(m: dict, key: str, source: str, required: bool = True) -> Any:
    node: Any = m
    for part in key.split("."):
        if not isinstance(node, dict):
            raise _fail(source, key.rsplit(".", 1)[0], "a JSON object", node)
        if part not in node:
            if required:
                raise CheckpointError(f"{source}: missing key {key!r}")
            return None
        node = node[part]
    return node


def check_int(m: dict, key: str, source: str, lo: int, hi: int, required: bool = True) -> Any:
    """An integer in [lo, hi] (JSON booleans and floats such as 1e9 are refused)."""
    v = _get(m, key, source, required)
    if v is None and not required:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _fail(source, key, f"an integer in [{lo}, {hi}]", v)
    return v


def check_text(value: Any, key: str, source: str, max_len: int = TEXT_MAX) -> str:
    """Printable text of at most ``max_len`` characters (no newlines or control characters)."""
    if not isinstance(value, str) or not value.isprintable() or not 0 < len(value) <= max_len:
        raise _fail(source, key, f"printable text of 1 to {max_len} characters", value)
    return value


def check_column(value: Any, key: str, source: str) -> str:
    """A metadata column name: a letter or _, then letters, digits, _ . % ( ) - (at most 64 characters)."""
    if not isinstance(value, str) or not COLUMN.fullmatch(value):
        raise _fail(source, key, "a column name (letters, digits, _ . % ( ) -; at most 64 characters)", value)
    return value


def check_rel_path(value: Any, key: str, source: str) -> str:
    """An image's path relative to its data folder: printable, not absolute, no '..' part."""
    check_text(value, key, source, max_len=512)
    p = PurePosixPath(value.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or re.match(r"^[A-Za-z]:", value):
        raise _fail(source, key, "a path inside the data folder (relative, no '..')", value)
    return value


def check_float(v: Any, key: str, source: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _fail(source, key, "a finite number", v)
    return float(v)


def validate_manifest(m: dict, source: str) -> dict:
    """Check every manifest value the project reads against its type and bounds; returns ``m`` unchanged.
    Each failure is one CheckpointError naming the key."""
    files = _get(m, "files", source)
    if not isinstance(files, dict):
        raise _fail(source, "files", "a table of sha256 sums", files)
    for name, digest in files.items():
        if name not in BUNDLE_FILES:
            raise _fail(source, "files", f"a table over {', '.join(BUNDLE_FILES)} only (no paths)", name)
        if not isinstance(digest, str) or not SHA256.fullmatch(digest):
            raise _fail(source, f"files.{name}", "a sha256 hex digest", digest)
    if "name" in m:
        check_text(m["name"], "name", source)
    check_int(m, "image_size", source, *LIMITS["image_size"])
    channels = _get(m, "channels", source, required=False)
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise _fail(source, "channels", "1 or 3", channels)
    T = check_int(m, "T", source, *LIMITS["T"])
    if _get(m, "schedule", source) not in SCHEDULES:
        raise _fail(source, "schedule", f"one of {', '.join(SCHEDULES)}", m["schedule"])
    L = check_int(m, "num_classes", source, *LIMITS["num_classes"])
    thresholds = _get(m, "thresholds", source)
    if not isinstance(thresholds, list) or len(thresholds) != L:
        raise _fail(source, "thresholds", f"a list of num_classes = {L} numbers", thresholds)
    values = [check_float(v, f"thresholds[{i}]", source) for i, v in enumerate(thresholds)]
    for i in range(1, L):
        if values[i] < values[i - 1]:
            raise _fail(source, f"thresholds[{i}]", f"at least thresholds[{i - 1}] = {values[i - 1]:.6g} "
                        "(quantile thresholds never decrease)", values[i])
    score = _get(m, "score", source)
    if not isinstance(score, dict):
        raise _fail(source, "score", "a JSON object", score)
    from core.maths.score import DISTANCES

    if _get(m, "score.distance", source) not in DISTANCES:
        raise _fail(source, "score.distance", f"one of {', '.join(DISTANCES)}", score["distance"])
    check_int(m, "score.t", source, 0, T - 1)
    check_int(m, "score.draws", source, *LIMITS["score.draws"])
    check_int(m, "score.seed", source, *LIMITS["score.seed"])
    if not isinstance(score.get("clip", True), bool):
        raise _fail(source, "score.clip", "true or false", score["clip"])
    dataset = _get(m, "dataset", source, required=False)
    if dataset is not None:
        if not isinstance(dataset, dict):
            raise _fail(source, "dataset", "a JSON object", dataset)
        if dataset.get("truth") is not None:
            check_column(dataset["truth"], "dataset.truth", source)
        if dataset.get("name") is not None:
            check_text(dataset["name"], "dataset.name", source)
        check_int(m, "dataset.n", source, *LIMITS["dataset.n"], required=False)
    band = _get(m, "config.slice_band", source, required=False) if isinstance(m.get("config"), dict) else None
    if band is not None:
        if not isinstance(band, list) or len(band) != 2:
            raise _fail(source, "config.slice_band", "[LO, HI] with 0 <= LO < HI <= 1", band)
        lo, hi = (check_float(v, "config.slice_band", source) for v in band)
        if not 0 <= lo < hi <= 1:
            raise _fail(source, "config.slice_band", "[LO, HI] with 0 <= LO < HI <= 1", band)
    app = _get(m, "app", source, required=False)
    if app is not None:
        if not isinstance(app, dict):
            raise _fail(source, "app", "a JSON object", app)
        if app.get("sampler") is not None and app["sampler"] not in APP_SAMPLERS:
            raise _fail(source, "app.sampler", f"one of {', '.join(APP_SAMPLERS)}", app["sampler"])
        lo, hi = LIMITS["app.steps"]
        check_int(m, "app.steps", source, lo, min(hi, T), required=False)
    return m
