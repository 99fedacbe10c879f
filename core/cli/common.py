"""What every command shares: the one-line error exit, progress bars, argument checks, data loading."""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

EXIT_USER_ERROR = 2
_OPEN_BARS: list = []  # progress bars of this command: closed before an error line is written


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise SystemExit(_fail(f"{self.prog}: {message}"))


def _fail(message: str) -> int:
    close_bars()  # the error line starts on a line of its own, never after a bar
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


def close_bars() -> None:
    while _OPEN_BARS:
        _OPEN_BARS.pop().close()


def _bar(total: int, desc: str, enabled: bool = True):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)
    _OPEN_BARS.append(bar)
    return bar


def finite_float(text: str) -> float:
    """argparse type: a finite float; NaN and infinity are refused (argparse names the flag)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


finite_float.__name__ = "finite number"  # argparse: "argument --scale: invalid finite number value: 'nan'"


def seed_int(text: str) -> int:
    """argparse type: a seed, an integer in [0, 2**63)."""
    value = int(text)
    if not 0 <= value < 2 ** 63:
        raise ValueError(text)
    return value


seed_int.__name__ = "seed (integer >= 0)"


def check_output(path, flag: str, kind: str) -> None:
    """Before any work: ``path`` is a folder that can be made and written (kind "dir") or a file that can be
    written or replaced (kind "file"); otherwise one DataError naming ``flag``. Nothing is created."""
    from core.errors import DataError

    p = Path(path)
    if kind == "dir" and p.exists() and not p.is_dir():
        raise DataError(f"{flag} {p}: is a file, not a folder")
    if kind == "file" and p.is_dir():
        raise DataError(f"{flag} {p}: is a folder, not a file")
    folder = p if kind == "dir" else p.parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DataError(f"{flag} {p}: {existing} is a file, so no folder can be made under it")
    import tempfile

    try:  # a real write, not os.access: read-only mounts, ACLs and root all answer truthfully here
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise DataError(f"{flag} {p}: cannot write in {existing} ({e.strerror or type(e).__name__})") from None


def _accelerator():
    from core.nets.train import make_accelerator

    return make_accelerator()


def _positive(name: str, value, minimum=1):
    if value < minimum:
        raise ValueError(f"--{name} must be >= {minimum}, got {value}")
    return value


def _ints(name: str, text: str) -> tuple:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--{name} must be comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise ValueError(f"--{name} must be positive integers, got {text!r}")
    return vals


def _widths(text: str) -> tuple:
    vals = _ints("widths", text)
    if min(vals) < 4 or any(v % 4 for v in vals):
        raise ValueError(f"--widths must be positive multiples of 4, got {text!r}")
    return vals


def _band(text: str) -> tuple:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--slice-band must be two fractions LO,HI, got {text!r}") from None
    if not 0 <= lo < hi <= 1:
        raise ValueError(f"--slice-band must satisfy 0 <= LO < HI <= 1, got {text!r}")
    return lo, hi


def add_stream_flags(p) -> None:
    """The flags of every command that streams --data (issue 28): workers, chunking and dataset columns."""
    from core.bundles.stream import CHUNK

    p.add_argument("--workers", type=int, default=0, help="DataLoader processes that decode images (default 0: "
                                                          "this process)")
    p.add_argument("--chunk", type=int, default=CHUNK, help=f"images per chunk of a folder or dataset: the unit "
                                                            f"written, resumed and shared out (default {CHUNK}; a "
                                                            f"tar shard or Parquet row group is one chunk)")
    p.add_argument("--image-column", default=None, help="datasets / Parquet: the image column (default: the one "
                                                        "Image column, else 'image')")
    p.add_argument("--label-column", default=None, help="datasets / Parquet: the class column (default 'label' "
                                                        "when present)")


def _stream_data(a, size: int, channels: int, cache_mb: int = 1024, quiet: bool = False):
    """--data as an ImageSet whose images are decoded on demand (core.bundles.random_access.LazyImages) instead
    of held (issue 28): one streaming pass finds the readable images (and lists the skips) keeping no pixels,
    then training reads each minibatch from disk behind a ``cache_mb`` cache."""
    from core.bundles.data import ImageSet
    from core.bundles.random_access import LazyImages, RandomAccess
    from core.bundles.stream import class_names_for, collect, open_source

    _positive("workers", a.workers, 0)
    _positive("chunk", a.chunk)
    source = open_source(a.data, size, channels, _band(a.slice_band), a.image_column, a.label_column, chunk=a.chunk)
    bar = _bar(source.slots, "check images", enabled=not quiet)
    got = collect(source, a.workers, progress=bar.update)
    bar.close()
    if not quiet:
        report_skipped(got.skipped, source.slots)
    class_ids = torch.from_numpy(got.class_ids) if got.class_ids is not None else None
    images = LazyImages(RandomAccess(source), got.slots, cache_bytes=int(cache_mb) << 20, threads=max(1, a.workers))
    return ImageSet(str(a.data), got.names, images, class_ids, class_names_for(source, got.class_ids), got.skipped,
                    torch.from_numpy(got.slots))


def report_skipped(skipped: list, total: int, what: str = "image") -> None:
    """The CLI's one account of unreadable inputs: how many of how many, then the first ten with their reasons."""
    if not skipped:
        return
    print(f"skipped {len(skipped)} unreadable {what}(s) of {total}:", file=sys.stderr)
    for rel, why in skipped[:10]:
        print(f"  {rel}: {why}", file=sys.stderr)
