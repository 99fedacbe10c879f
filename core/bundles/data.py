"""Image folders to tensors, with every bad file turned into a reported skip.

A data folder holds images (PNG, JPEG, BMP, GIF, TIFF, WebP) at any depth. When every image lies
in an immediate sub-folder, the sub-folders are the data classes (sorted by name).
Each image is converted explicitly to the model's channels (1 = grey, 3 = RGB), centre-cropped to
a square and resized with Lanczos (antialiased) to ``size``. Images cross this module as uint8
(N, C, H, W); ``to_model_range`` maps them to float [-1, 1].
"""
from __future__ import annotations

import io
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from core.maths.eps_model import to_model_range  # noqa: F401 (the data's side of the model's range)
from core.errors import DataError, InvalidImageError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
NIFTI_EXTS = (".nii", ".nii.gz")
MAX_VOLUME_BYTES = 1 << 30  # refuse NIfTI volumes whose header promises more than 1 GiB of voxels
DEFAULT_BAND = (0.4, 0.6)  # axial slices taken from this fraction of the volume's z extent
MAX_PIXELS = 64_000_000  # refuse larger images from the header, before decoding
HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


@dataclass(frozen=True)
class ImageSet:
    """A loaded folder: ``images`` uint8 (N, C, H, W); ``class_ids`` int64 (N,) or None; ``rows`` int64 (N,):
    each image's slot in the folder's listing (core.bundles.stream), the index its per-image noise is keyed by:
    an unreadable file keeps its slot, so rows equal 0..N-1 only where nothing was skipped."""

    root: str
    paths: list  # relative POSIX paths, sorted; row i of images is paths[i]
    images: torch.Tensor
    class_ids: Optional[torch.Tensor] = None
    class_names: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # [(relative path, reason)]
    rows: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.rows is None:
            object.__setattr__(self, "rows", torch.arange(len(self.paths)))

    def __len__(self) -> int:
        return len(self.paths)


def list_images(root: str | os.PathLike) -> tuple[list[str], Optional[list[int]], list[str]]:
    """Relative paths of the images under ``root`` (sorted) and, when laid out by sub-folder, their classes."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--data {root}: no such folder")
    paths = sorted(_walk_files(str(root)))
    if not paths:
        raise DataError(f"--data {root}: no images found (looked for {', '.join(IMAGE_EXTS + NIFTI_EXTS)})")
    tops = [p.split("/")[0] if "/" in p else None for p in paths]
    if all(t is not None for t in tops) and len(set(tops)) >= 2:
        names = sorted(set(tops))
        index = {n: i for i, n in enumerate(names)}
        return paths, [index[t] for t in tops], names
    return paths, None, []


def _walk_files(root: str) -> Iterator[str]:
    """Relative POSIX paths of the supported, non-hidden files under ``root``, recursively (a symlinked folder is
    followed, each folder read once): plain strings from ``os.scandir``, no Path object per file, so listing 200K
    files peaks at their names' size rather than ~600 bytes a file (issue 28)."""
    seen, stack = set(), [("", root)]
    while stack:
        rel, path = stack.pop()
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(path) as entries:
                for e in entries:
                    r = f"{rel}/{e.name}" if rel else e.name
                    try:
                        if e.is_dir():
                            stack.append((r, e.path))
                        elif _is_supported(e.name) and not e.name.startswith(".") and e.is_file():
                            yield r
                    except OSError:
                        continue
        except OSError:
            continue


def _is_supported(name: str) -> bool:
    low = name.lower()
    return low.endswith(IMAGE_EXTS) or low.endswith(NIFTI_EXTS)


def is_nifti(name: str) -> bool:
    return name.lower().endswith(NIFTI_EXTS)


def _square_resize(arr01: np.ndarray, size: int) -> np.ndarray:
    """float (H, W) in [0, 1] -> uint8 (size, size): centre crop to a square, Lanczos resize."""
    img = Image.fromarray((np.clip(arr01, 0, 1) * 255).round().astype(np.uint8), mode="L")
    side = min(img.size)
    left, top = (img.size[0] - side) // 2, (img.size[1] - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8)


def load_nifti_slices(path: str | os.PathLike, size: int, band: tuple = DEFAULT_BAND,
                      max_bytes: int = MAX_VOLUME_BYTES, data: Optional[bytes] = None) -> list[tuple[int, np.ndarray]]:
    """Axial slices of a 3-D NIfTI volume from ``band`` (fractions of z), each min-max normalised to
    [0, 1] (Section C) and resized: [(z, uint8 (1, size, size))]. The format is read from the content
    (gzip or not, NIfTI-1 or -2 by the header size), never from the name; the header is validated before
    any voxel is read; only the band's slices are decoded, one at a time (a gzip stream is still read to
    its end, without keeping it, so a truncated file is refused); ``data``: the file's bytes already in
    memory (an upload), ``path`` then only names it. Every failure is an InvalidImageError naming the file."""
    import gzip

    path = Path(path)
    if not 0 <= band[0] < band[1] <= 1:
        raise ValueError(f"slice band must satisfy 0 <= lo < hi <= 1, got {band}")
    try:
        raw = io.BytesIO(data) if data is not None else open(path, "rb")
    except OSError as e:
        raise InvalidImageError(f"{path}: cannot open ({e.strerror or type(e).__name__})") from None
    out = []
    with raw:
        compressed = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
        file_bytes = len(data) if data is not None else path.stat().st_size
        for z, sl in _nifti_band(stream, path, compressed, max_bytes, file_bytes, band):
            sl = np.rot90(sl)
            a, b = float(sl.min()), float(sl.max())
            if b <= a:
                continue  # empty slice
            out.append((z, _square_resize((sl - a) / (b - a), size)[None]))
    if not out:
        raise InvalidImageError(f"{path}: no non-empty slice in band {band}")
    return out


def nifti_class(head: bytes):
    """nibabel's NIfTI-1 or NIfTI-2 image class from a header's first 4 bytes (its size, either byte order), or
    None for anything else."""
    import nibabel as nib

    sizeof_hdr = {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")}
    return nib.Nifti1Image if 348 in sizeof_hdr else nib.Nifti2Image if 540 in sizeof_hdr else None


def band_slices(depth: int, band: tuple) -> range:
    """The axial slices z of a volume ``depth`` deep that the ``band`` (fractions LO, HI of z) takes, at least one."""
    lo, hi = int(np.floor(band[0] * depth)), int(np.ceil(band[1] * depth))
    return range(lo, min(max(hi, lo + 1), depth))


def _nifti_band(stream, path: Path, compressed: bool, max_bytes: int, file_bytes: int, band: tuple):
    """Yield (z, float32 (X, Y)) for each axial slice of ``band`` of a NIfTI-1/2 stream, header checks first
    (type, ndim, size, truncation); NaN or infinite voxels in a band slice are refused. Memory: one slice."""
    try:
        head = stream.read(4)
        stream.seek(0)
    except (OSError, EOFError) as e:
        raise InvalidImageError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from None
    if len(head) < 4:
        raise InvalidImageError(f"{path}: not a NIfTI file (empty or too short)")
    cls = nifti_class(head)
    if cls is None:
        raise InvalidImageError(f"{path}: not a NIfTI-1/2 file (its header does not start with a NIfTI header size)")
    try:
        img = cls.from_stream(stream)  # reads the header only; voxels stay behind an array proxy
    except Exception as e:  # noqa: BLE001 - nibabel raises many types for foreign files
        raise InvalidImageError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from None
    shape = tuple(int(v) for v in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InvalidImageError(f"{path}: expected a 3-D volume, got shape {tuple(img.shape)}")
    if min(shape) < 1:
        raise InvalidImageError(f"{path}: empty volume {shape}")
    nbytes = math.prod(shape) * img.get_data_dtype().itemsize  # Python ints: an int64 product could wrap to 0
    if nbytes > max_bytes:
        raise InvalidImageError(f"{path}: header promises {nbytes / 2**20:,.0f} MiB of voxels (limit {max_bytes / 2**20:,.0f} MiB)")
    offset = int(img.header.get("vox_offset", 0))
    if not compressed and file_bytes < offset + nbytes:
        raise InvalidImageError(f"{path}: truncated ({file_bytes} bytes, header needs {offset + nbytes})")
    extra = (0,) * (len(img.shape) - 3)  # (X, Y, Z, 1) volumes
    for z in band_slices(shape[2], band):
        try:
            sl = np.asarray(img.dataobj[(slice(None), slice(None), z) + extra], dtype=np.float32)
        except Exception as e:  # noqa: BLE001 - EOFError, zlib.error, OSError, ValueError from truncated data
            raise InvalidImageError(f"{path}: cannot read voxels ({type(e).__name__}: {e})") from None
        if not np.isfinite(sl).all():
            raise InvalidImageError(f"{path}: contains NaN or infinite voxels")
        yield z, sl
    if compressed:  # read the rest of the stream, keeping nothing: a truncated gzip is refused as before
        try:
            stream.seek(0, io.SEEK_END)
            end = stream.tell()
        except Exception as e:  # noqa: BLE001 - EOFError, zlib.error, OSError
            raise InvalidImageError(f"{path}: cannot read voxels ({type(e).__name__}: {e})") from None
        if end < offset + nbytes:
            raise InvalidImageError(f"{path}: truncated ({end} bytes decompressed, header needs {offset + nbytes})")


def _to_8bit(img: Image.Image) -> Image.Image:
    """High bit-depth greyscale (I;16, I, F) to 8-bit by per-image min-max (Section C normalises per slice)."""
    arr = np.asarray(img, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError("non-finite pixel values")
    lo, hi = float(arr.min()), float(arr.max())
    scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo)
    return Image.fromarray((scaled * 255).round().astype(np.uint8), mode="L")


def load_image(path: str | os.PathLike, size: int, channels: int, data: Optional[bytes] = None) -> np.ndarray:
    """Decode one image to uint8 (C, size, size); any failure is an InvalidImageError naming the file.
    ``data``: the file's bytes already in memory (an upload); ``path`` then only names it."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data) if data is not None else path) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise InvalidImageError(f"{path}: {w}x{h} pixels is over the {MAX_PIXELS:,}-pixel limit")
                img.load()  # truncated files fail here, inside the guard
                if img.mode in HIGH_DEPTH_MODES:
                    img = _to_8bit(img)
                if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                    img = img.convert("RGBA")
                    bg = Image.new("RGBA", img.size, (0, 0, 0, 255))  # transparent pixels become black
                    img = Image.alpha_composite(bg, img)
                img = img.convert("L" if channels == 1 else "RGB")
                side = min(img.size)
                left, top = (img.size[0] - side) // 2, (img.size[1] - side) // 2
                img = img.crop((left, top, left + side, top + side))
                if side != size:
                    img = img.resize((size, size), Image.Resampling.LANCZOS)
                arr = np.asarray(img, dtype=np.uint8)
    except InvalidImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidImageError(f"{path}: refused as a decompression bomb ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        why = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))  # bytes in memory: no address
        raise InvalidImageError(f"{path}: cannot decode image ({type(e).__name__}: {why})") from None
    if min(arr.shape[:2]) < 1:
        raise InvalidImageError(f"{path}: empty image")
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def load_image_folder(root: str | os.PathLike, size: int, channels: int,
                      progress: Optional[Callable[[int, int], None]] = None, slice_band: tuple = DEFAULT_BAND) -> ImageSet:
    """Load every readable image under ``root`` into memory; unreadable ones are skipped and listed, never fatal
    alone. The stream of core.bundles.stream read whole (for data that fits; the streaming commands read it
    chunk by chunk). NIfTI volumes contribute their axial slices in ``slice_band``, named ``FILE#zNNN``."""
    from core.bundles.stream import class_names_for, collect, open_source

    src = open_source(str(root), size, channels, slice_band)
    done = [0]

    def step(k):  # slots handled of all slots (a NIfTI volume is its band's slices)
        done[0] += k
        progress(min(done[0], src.slots), src.slots)

    got = collect(src, keep_images=True, progress=step if progress is not None else None)
    if progress is not None:
        progress(src.slots, src.slots)
    class_ids = torch.from_numpy(got.class_ids) if got.class_ids is not None and src.class_names else None
    return ImageSet(str(root), got.names, torch.from_numpy(got.images), class_ids,
                    class_names_for(src, got.class_ids) if class_ids is not None else [], got.skipped,
                    torch.from_numpy(got.slots))


# ----------------------------------------------------------------------------------------------
# one uploaded file (the app's "Score an image" tab): size, then type from content, then the decoders' checks
UPLOAD_MAX_BYTES = 20 * 2**20  # a public Space takes at most this much per upload
# An uploaded NIfTI's header may promise at most this much voxel data. 64 MiB holds a 1 mm brain MRI
# (256^3 int16 = 32 MiB; as float32 64 MiB), about what a 20 MB .nii.gz of real scan data carries. The
# decoder keeps one slice at a time (load_nifti_slices), so memory no longer grows with the volume, but a
# small gzip can still declare a large volume of zeros and every declared byte is decompressed (to detect
# truncation) while the upload holds the one sampling slot: at 255 MiB that was 3 s and 1 GB of RSS
# (probe up_gzip_nifti_bomb_255MiB_zeros); at 64 MiB it is a fraction of a second and a server holds the
# bytes of several such uploads over. Larger declarations are refused from the header, before decompression.
UPLOAD_MAX_VOXEL_BYTES = 64 * 2**20
UPLOAD_KINDS = ("PNG", "JPEG", "NIfTI")


@dataclass(frozen=True)
class Upload:
    """A decoded upload: ``kind`` in UPLOAD_KINDS; ``slices`` [(z or None, uint8 (C, size, size))]: one image,
    or a NIfTI volume's axial slices in the band (z = index in the volume)."""

    name: str
    kind: str
    slices: list


def sniff(head: bytes) -> Optional[str]:
    """The upload kind from a file's first bytes (PNG, JPEG, NIfTI plain or gzipped), or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x1f\x8b") or (len(head) >= 4 and {int.from_bytes(head[:4], "little"),
                                                            int.from_bytes(head[:4], "big")} & {348, 540}):
        return "NIfTI"
    return None


def read_upload(path: str | os.PathLike, size: int, channels: int, band: tuple = DEFAULT_BAND,
                max_bytes: int = UPLOAD_MAX_BYTES, name: Optional[str] = None) -> Upload:
    """Read one uploaded file into memory and decode it as the bundle's data is decoded (conversion to
    ``channels``, centre crop, Lanczos resize to ``size``; NIfTI: slices of ``band``). The size is checked
    before reading, the type comes from the content (never the name), and the decoders' checks (pixel
    limit, decompression bomb, NIfTI header) run before any pixel or voxel is decoded. One InvalidImageError
    line for anything refused. Writes nothing; the caller deletes the file."""
    path = Path(path)
    label = name or path.name
    try:
        n = path.stat().st_size
    except OSError as e:
        raise InvalidImageError(f"{label}: cannot read the upload ({e.strerror or type(e).__name__})") from None
    if n > max_bytes:
        raise InvalidImageError(f"{label}: {n / 2**20:.1f} MB is over the {max_bytes / 2**20:.0f} MB upload limit")
    if n == 0:
        raise InvalidImageError(f"{label}: the file is empty")
    data = path.read_bytes()
    kind = sniff(data[:8])
    if kind is None:
        raise InvalidImageError(f"{label}: not a PNG, JPEG or NIfTI file (judged by its content, not its name)")
    if kind == "NIfTI":
        slices = load_nifti_slices(label, size, band, max_bytes=UPLOAD_MAX_VOXEL_BYTES, data=data)
        if channels == 3:
            slices = [(z, np.repeat(a, 3, 0)) for z, a in slices]
        return Upload(label, kind, slices)
    return Upload(label, kind, [(None, load_image(label, size, channels, data=data))])
