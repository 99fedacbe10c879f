"""What every command shares: the one-line error exit, progress bars, argument checks, data loading."""
from __future__ import annotations

import argparse
import sys

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise SystemExit(_fail(f"{self.prog}: {message}"))


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


def _bar(total: int, desc: str, enabled: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)


def _accelerator():
    from ..train import make_accelerator

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


def _load_data(root: str, size: int, channels: int, quiet: bool = False, band: str = "0.4,0.6"):
    from ..data import list_images, load_image_folder

    slice_band = _band(band)
    n = len(list_images(root)[0])
    bar = _bar(n, "load images", enabled=not quiet)

    def progress(i, total):
        bar.n = i
        if i == total or i % 64 == 0:
            bar.refresh()

    data = load_image_folder(root, size, channels, progress=progress, slice_band=slice_band)
    bar.close()
    if data.skipped and not quiet:
        print(f"skipped {len(data.skipped)} unreadable image(s) of {n}:", file=sys.stderr)
        for rel, why in data.skipped[:10]:
            print(f"  {rel}: {why}", file=sys.stderr)
    return data
