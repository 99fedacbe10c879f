"""Images streamed from disk in bounded memory (issue 28): folders, Hugging Face datasets saved to disk, Parquet
files and WebDataset tar shards, read chunk by chunk in DataLoader workers.

A source is listed first, cheaply (file names, dataset lengths, Parquet row counts, tar member names; NIfTI
headers for their slice counts): it becomes a list of ``Chunk``s, each a run of consecutive *slots*. A slot is
one image the source promises (a file, a record, a tar sample, one axial slice of a NIfTI volume's band), and
its number is the row index every command keys per-image noise by (``minority_scores``' ``indices``). A slot
whose image cannot be read is skipped and named, but keeps its number, so every chunk can be read, scored and
resumed on its own, by any process: the same image gets the same noise whatever ran before it. Where nothing is
skipped, slot i is row i of ``load_image_folder``, as before.

Decoding is ``data.load_image`` / ``data.load_nifti_slices`` on every input kind (their checks against
decompression bombs, truncation and odd modes apply to bytes from Parquet and tar too). Rows cross this module as
``Piece``s: uint8 (n, C, H, W) with their slots, names and class ids, in slot order within a chunk.
"""
from __future__ import annotations

import glob
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from core.bundles.data import (DEFAULT_BAND, IMAGE_EXTS, InvalidImageError, band_slices, is_nifti, list_images,
                               load_image, load_nifti_slices, nifti_class)
from core.errors import DataError

CHUNK = 256  # slots per chunk of a folder or a dataset (a tar shard or a Parquet row group is one chunk)
PIECE = 32  # rows a worker hands over at a time
SOURCE_KINDS = ("folder", "datasets", "parquet", "webdataset")
TAR_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTS)


@dataclass(frozen=True)
class Chunk:
    """Slots ``start`` .. ``start + size - 1`` of a source, read as one unit; ``name`` says where they are."""

    index: int
    name: str
    start: int
    size: int
    ref: tuple = ()  # what the source needs to read it (FolderFiles, row range, shard path, row group)


class FolderFiles:
    """A folder chunk's files, stored compactly (a tuple of paths and three arrays rather than a tuple per file:
    ~20 bytes a file beside its name, not ~120; issue 28); iterates as (relative path, first slot, class id or
    None, first band slice) per file."""

    __slots__ = ("rels", "starts", "classes", "los")

    def __init__(self, rels, starts, classes, los):
        self.rels = tuple(rels)
        self.starts = np.asarray(starts, dtype=np.int64)
        self.classes = None if classes is None else np.asarray(classes, dtype=np.int64)
        self.los = np.asarray(los, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.rels)

    def __iter__(self):
        for i, rel in enumerate(self.rels):
            yield rel, int(self.starts[i]), None if self.classes is None else int(self.classes[i]), int(self.los[i])


@dataclass
class Piece:
    """Consecutive rows of one chunk: ``images`` uint8 (n, C, H, W), their ``slots`` (n,), names and class ids
    (n,) or None; ``skipped`` [(name, reason)]; ``last``: the chunk ends here."""

    chunk: int
    slots: np.ndarray
    names: list
    images: np.ndarray
    class_ids: Optional[np.ndarray] = None
    skipped: list = field(default_factory=list)
    last: bool = False


@dataclass
class Source:
    """A listed input: its kind, chunks, total slots, class names (empty: unlabelled) and how to decode."""

    kind: str
    spec: str
    chunks: list
    slots: int
    class_names: list
    size: int
    channels: int
    band: tuple = DEFAULT_BAND
    columns: tuple = (None, None)  # (image column, label column) of a dataset or Parquet files
    version: str = ""  # what the spec held when listed (a dataset's own fingerprint): a resume must find it again

    def fingerprint(self) -> dict:
        """What a resumed run must find unchanged: the kind, the spec, the chunking and the image geometry."""
        return {"kind": self.kind, "spec": self.spec, "slots": self.slots, "chunks": len(self.chunks),
                "chunk_sizes": [c.size for c in self.chunks][:4096], "size": self.size, "channels": self.channels,
                "band": list(self.band), "columns": list(self.columns), "class_names": self.class_names,
                **({"version": self.version} if self.version else {})}

    def read(self, chunk: Chunk) -> Iterator[Piece]:
        """The chunk's rows, decoded, in slot order, a Piece of at most PIECE rows at a time."""
        reader = {"folder": _read_folder, "datasets": _read_dataset, "parquet": _read_parquet,
                  "webdataset": _read_tar}[self.kind]
        buf, skipped = [], []
        for item in reader(self, chunk):
            if len(item) == 2:  # (name, reason): a skip
                skipped.append(item)
                continue
            buf.append(item)
            if len(buf) == PIECE:
                yield _piece(chunk, buf, skipped, False)
                buf, skipped = [], []
        yield _piece(chunk, buf, skipped, True)


def _piece(chunk: Chunk, rows: list, skipped: list, last: bool) -> Piece:
    slots = np.array([r[0] for r in rows], dtype=np.int64)
    images = np.stack([r[2] for r in rows]) if rows else np.zeros((0, 1, 1, 1), np.uint8)
    cls = [r[3] for r in rows]
    class_ids = np.array(cls, dtype=np.int64) if rows and cls[0] is not None else None
    return Piece(chunk.index, slots, [r[1] for r in rows], images, class_ids, list(skipped), last)


# ---- listing ------------------------------------------------------------------------------------------------
def open_source(spec: str, size: int, channels: int, band: tuple = DEFAULT_BAND, image_column: Optional[str] = None,
                label_column: Optional[str] = None, chunk: int = CHUNK) -> Source:
    """List ``spec`` (a folder, a ``datasets`` folder saved with save_to_disk, Parquet files or a glob of them,
    tar shards as a brace pattern or glob): a Source. Local files only; a bad spec is a DataError naming it."""
    if size < 8 or size > 1024:
        raise ValueError(f"size must be in [8, 1024], got {size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    p = Path(spec)
    if p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()
                       or (p / "state.json").is_file()):
        return _list_dataset(spec, size, channels, image_column, label_column, chunk)
    if p.is_dir():
        return _list_folder(spec, size, channels, band, chunk)
    files = _expand(spec)
    if files and all(f.endswith(".tar") for f in files):
        return _list_tar(spec, files, size, channels)
    if files and all(f.endswith(".parquet") for f in files):
        return _list_parquet(spec, files, size, channels, image_column, label_column)
    if files:
        raise DataError(f"--data {spec}: mixed or unsupported files (expected all .tar or all .parquet; got "
                        f"{', '.join(sorted({Path(f).suffix or Path(f).name for f in files})[:5])})")
    if hub_id(spec):
        return _list_dataset(spec, size, channels, image_column, label_column, chunk)
    raise DataError(f"--data {spec}: no such folder, dataset, Parquet file or tar shard")


def hub_id(spec: str) -> Optional[str]:
    """The Hugging Face Hub dataset id ``spec`` names, else None: ``hf://datasets/OWNER/NAME``, or a bare
    ``OWNER/NAME`` that cannot be a local path (no such path, no folder OWNER here, NAME without a file suffix),
    so that a mistyped ``data/mri`` or ``shards/x.tar`` stays "no such folder"."""
    import re

    explicit = spec.startswith("hf://datasets/")
    name = spec[len("hf://datasets/"):] if explicit else spec
    if os.path.exists(spec) or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", name):
        return None
    owner, repo = name.split("/")
    if not explicit and (os.path.exists(owner) or Path(repo).suffix.lower() in
                         (".tar", ".parquet", ".arrow", ".png", ".jpg", ".jpeg", ".nii", ".gz", ".csv", ".npz")):
        return None
    return name


def _expand(spec: str) -> list:
    """Files named by a brace pattern (WebDataset's {000..099}) and/or a glob, sorted; existing files only."""
    from braceexpand import braceexpand

    out = []
    for pattern in braceexpand(spec):
        hits = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        out += [h for h in hits if os.path.isfile(h)]
    return out


def _list_folder(spec, size, channels, band, chunk) -> Source:
    paths, classes, names = list_images(spec)
    bands = np.array([_band_of(Path(spec) / rel, band) if is_nifti(rel) else (0, 1) for rel in paths],
                     dtype=np.int64).reshape(len(paths), 2)
    starts = np.concatenate([[0], np.cumsum(bands[:, 1])]).astype(np.int64)
    cls = None if classes is None else np.asarray(classes, dtype=np.int64)
    chunks = []
    for c, lo in enumerate(range(0, len(paths), chunk)):
        hi = min(lo + chunk, len(paths))
        ref = FolderFiles(paths[lo:hi], starts[lo:hi].copy(), None if cls is None else cls[lo:hi].copy(),
                          bands[lo:hi, 0])
        chunks.append(Chunk(c, f"{paths[lo]} .. {paths[hi - 1]}", int(starts[lo]), int(starts[hi] - starts[lo]), ref))
    return Source("folder", spec, chunks, int(starts[-1]), names, size, channels, band)


def _band_of(path: Path, band: tuple) -> tuple:
    """(first z, number of slices) of a NIfTI volume's band, from its header alone ((0, 1) for a header that
    cannot be read: the read then skips the file and names why)."""
    import gzip

    try:
        with open(path, "rb") as raw:
            stream = gzip.GzipFile(fileobj=raw) if raw.read(2) == b"\x1f\x8b" else raw
            raw.seek(0)
            head = stream.read(4)
            stream.seek(0)
            cls = nifti_class(head)
            zs = band_slices(int(cls.from_stream(stream).shape[2]), band)
    except Exception:  # noqa: BLE001 - any unreadable header: one slot, skipped with its reason when read
        return 0, 1
    return zs.start, max(1, len(zs))


def _list_dataset(spec, size, channels, image_column, label_column, chunk) -> Source:
    ds = _load_dataset(spec)
    image_column, label_column, names = _columns(ds.features, image_column, label_column, spec)
    chunks = [Chunk(c, f"rows {lo}..{min(lo + chunk, len(ds)) - 1}", lo, min(chunk, len(ds) - lo), (lo,))
              for c, lo in enumerate(range(0, len(ds), chunk))]
    if not chunks:
        raise DataError(f"--data {spec}: the dataset has no rows")
    return Source("datasets", spec, chunks, len(ds), names, size, channels, columns=(image_column, label_column),
                  version=str(getattr(ds, "_fingerprint", "") or ""))


_DATASETS: dict = {}  # (spec, its files' stamp) -> the dataset, opened once per process, not once per chunk (a
# forked DataLoader worker inherits it); a folder saved again gets a new stamp and is opened again


def _load_dataset(spec: str):
    try:
        stamp = tuple(sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in os.scandir(spec)))
    except OSError:
        stamp = ()  # a Hub id
    key = (spec, stamp)
    if key not in _DATASETS:
        _DATASETS.clear()  # one source at a time
        _DATASETS[key] = _open_dataset(spec)
    return _DATASETS[key]


def _open_dataset(spec: str):
    import datasets

    repo = hub_id(spec)
    if repo is not None:  # the Hub: datasets downloads (or reuses its cache); the train split
        try:
            return datasets.load_dataset(repo, split="train")
        except (ConnectionError, OSError) as e:
            offline = any(os.environ.get(k, "").lower() in ("1", "true", "yes")
                          for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
            why = ("this machine is offline (HF_HUB_OFFLINE=1) and the dataset is not in the local cache" if offline
                   else f"it could not be fetched ({type(e).__name__}: {str(e)[:120]})")
            raise DataError(f"--data {spec}: no such local folder or file, so it was read as a Hugging Face Hub "
                            f"dataset id; {why}. Where the Hub can be reached, run "
                            f"python -c \"import datasets; datasets.load_dataset('{repo}', split='train')"
                            f".save_to_disk('DIR')\" and pass --data DIR") from None
        except Exception as e:  # noqa: BLE001 - datasets raises several types for missing or private repos
            raise DataError(f"--data {spec}: no such local folder or file, and as a Hugging Face Hub dataset id it "
                            f"could not be loaded ({type(e).__name__}: {str(e)[:160]})") from None
    try:
        ds = datasets.load_from_disk(spec)
    except Exception as e:  # noqa: BLE001 - datasets raises several types for foreign folders
        raise DataError(f"--data {spec}: not a dataset saved with save_to_disk ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1 and "train" not in ds:
            raise DataError(f"--data {spec}: a DatasetDict with splits {sorted(ds)}; save the split to score")
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    return ds


def _columns(features, image_column, label_column, spec) -> tuple:
    """(image column, label column or None, class names) of a dataset's or Parquet file's columns."""
    cols = list(features)
    if image_column is None:
        typed = [c for c in cols if type(features[c]).__name__ == "Image"]
        image_column = typed[0] if len(typed) == 1 else "image" if "image" in cols else None
    if image_column not in cols:
        raise DataError(f"--data {spec}: no image column {image_column!r} (columns: {', '.join(cols)}); "
                        f"name it with --image-column")
    if label_column is None and "label" in cols:
        label_column = "label"
    if label_column is not None and label_column not in cols:
        raise DataError(f"--data {spec}: no label column {label_column!r} (columns: {', '.join(cols)})")
    names = []
    if label_column is not None:
        feat = features[label_column]
        names = list(getattr(feat, "names", None) or [])
    return image_column, label_column, names


def _list_parquet(spec, files, size, channels, image_column, label_column) -> Source:
    import pyarrow.parquet as pq

    chunks, start, features = [], 0, None
    for f in files:
        try:
            meta = pq.ParquetFile(f)
        except Exception as e:  # noqa: BLE001 - pyarrow's ArrowInvalid, OSError
            raise DataError(f"--data {f}: not a readable Parquet file ({type(e).__name__}: {e})") from None
        if features is None:
            features = _parquet_features(meta, f)
        for g in range(meta.num_row_groups):
            n = meta.metadata.row_group(g).num_rows
            chunks.append(Chunk(len(chunks), f"{Path(f).name} row group {g}", start, n, (f, g)))
            start += n
    image_column, label_column, names = _columns(features, image_column, label_column, spec)
    if start == 0:
        raise DataError(f"--data {spec}: the Parquet files hold no rows")
    return Source("parquet", spec, chunks, start, names, size, channels, columns=(image_column, label_column))


def _parquet_features(meta, f):
    """The ``datasets`` features a Parquet file written by ``datasets`` records (class names live there), else
    plain column names."""
    import datasets

    schema_meta = meta.schema_arrow.metadata or {}
    info = schema_meta.get(b"huggingface")
    if info:
        try:
            return datasets.Features.from_dict(json.loads(info)["info"]["features"])
        except Exception:  # noqa: BLE001 - foreign metadata: fall back to the column names
            pass
    return {name: None for name in meta.schema_arrow.names}


def _list_tar(spec, files, size, channels) -> Source:
    chunks, start, labelled = [], 0, None
    for f in files:
        keys, has_cls = _tar_keys(f)  # a damaged shard lists what precedes the damage; reading names it
        labelled = has_cls if labelled is None else labelled and has_cls
        chunks.append(Chunk(len(chunks), Path(f).name, start, len(keys), (f, tuple(keys))))
        start += len(keys)
    if start == 0:
        raise DataError(f"--data {spec}: no images in the tar shards (looked for members ending in "
                        f"{', '.join('.' + e for e in TAR_IMAGE_EXTS)})")
    names = []
    return Source("webdataset", spec, chunks, start, names, size, channels, columns=(None, "cls" if labelled else None))


def _tar_keys(path) -> tuple:
    """(sample keys with an image member, in order, up to any damage; whether every such sample has a .cls
    member). Member names only: nothing is decoded."""
    from webdataset.tariterators import base_plus_ext

    keys, with_cls = [], set()
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = base_plus_ext(m.name)
                if key is None:
                    continue
                if ext.lower() in TAR_IMAGE_EXTS and (not keys or keys[-1] != key):
                    keys.append(key)
                elif ext == "cls":
                    with_cls.add(key)
    except (tarfile.TarError, OSError, EOFError):
        pass
    return keys, bool(keys) and all(k in with_cls for k in keys)


# ---- reading (on DataLoader workers) ---------------------------------------------------------------------------
def _read_folder(src: Source, chunk: Chunk):
    root = Path(src.spec)
    for rel, start, cls, lo in chunk.ref:
        try:
            if is_nifti(rel):
                for z, a in load_nifti_slices(root / rel, src.size, src.band):
                    yield start + (z - lo), f"{rel}#z{z:03d}", a if src.channels == 1 else np.repeat(a, 3, 0), cls
            else:
                yield start, rel, load_image(root / rel, src.size, src.channels), cls
        except InvalidImageError as e:
            yield rel, str(e).split(": ", 1)[-1]


def _encoded(value, name) -> bytes:
    """The encoded bytes of a dataset cell: {'bytes': ..., 'path': ...} (datasets' Image, undecoded) or bytes."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        if value.get("path"):
            with open(value["path"], "rb") as f:
                return f.read()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise InvalidImageError(f"{name}: the image cell holds {type(value).__name__}, not encoded image bytes")


def _label(value, name) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InvalidImageError(f"{name}: label {value!r} is not a class index >= 0")
    return int(value)


def _read_dataset(src: Source, chunk: Chunk):
    import datasets

    ds = _load_dataset(src.spec)
    image_column, label_column = src.columns
    if type(ds.features[image_column]).__name__ == "Image":
        ds = ds.cast_column(image_column, datasets.Image(decode=False))  # our decoder and its checks, not PIL's
    rows = ds.select(range(chunk.start, chunk.start + chunk.size))
    for k, rec in enumerate(rows):
        slot, name = chunk.start + k, f"row {chunk.start + k}"
        try:
            cls = _label(rec[label_column], name) if label_column else None
            yield slot, name, load_image(name, src.size, src.channels, data=_encoded(rec[image_column], name)), cls
        except InvalidImageError as e:
            yield name, str(e).split(": ", 1)[-1]


def _read_parquet(src: Source, chunk: Chunk):
    import pyarrow.parquet as pq

    f, g = chunk.ref
    image_column, label_column = src.columns
    cols = [image_column] + ([label_column] if label_column else [])
    try:
        table = pq.ParquetFile(f).read_row_group(g, columns=cols).to_pydict()
    except Exception as e:  # noqa: BLE001 - a damaged row group: every slot of it is skipped, named
        yield chunk.name, f"unreadable row group ({type(e).__name__}: {e})"
        return
    for k in range(chunk.size):
        slot, name = chunk.start + k, f"{Path(f).name} row {chunk.start + k}"
        try:
            cls = _label(table[label_column][k], name) if label_column else None
            yield slot, name, load_image(name, src.size, src.channels, data=_encoded(table[image_column][k], name)), cls
        except InvalidImageError as e:
            yield name, str(e).split(": ", 1)[-1]


def _read_tar(src: Source, chunk: Chunk):
    from webdataset.tariterators import tarfile_samples

    path, keys = chunk.ref
    slot_of = {k: chunk.start + i for i, k in enumerate(keys)}
    problems = []

    def handler(exn):  # webdataset hands a damaged shard's error here (with the shard's url): name it, go on
        problems.append(f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}")
        return True

    seen = set()
    for sample in tarfile_samples([{"url": path}], handler=handler):
        key = sample.get("__key__")
        if key not in slot_of or key in seen:
            continue
        seen.add(key)
        name = f"{Path(path).name}/{key}"
        ext = next((e for e in sample if e.lower() in TAR_IMAGE_EXTS), None)
        try:
            cls = None
            if src.columns[1]:
                text = sample.get("cls", b"").decode("utf-8", "replace").strip()
                if not text.isdigit():
                    raise InvalidImageError(f"{name}: .cls {text!r} is not a class index >= 0")
                cls = int(text)
            yield slot_of[key], name, load_image(f"{name}.{ext}", src.size, src.channels, data=sample[ext]), cls
        except InvalidImageError as e:
            yield name, str(e).split(": ", 1)[-1]
    for p in problems:
        yield Path(path).name, f"damaged shard: {p}"
    for key in keys:
        if key not in seen and not problems:
            yield f"{Path(path).name}/{key}", "listed but not read"


class ChunkStream(torch.utils.data.IterableDataset):
    """The given chunks of a source as Pieces; DataLoader worker w of W reads chunks w, w + W, ..."""

    def __init__(self, source: Source, chunks: list):
        self.source, self.chunks = source, list(chunks)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        mine = self.chunks if info is None else self.chunks[info.id::info.num_workers]
        for c in mine:
            yield from self.source.read(c)


def iterate(source: Source, chunks: list, workers: int = 0) -> Iterator[Piece]:
    """Pieces of ``chunks``, read by ``workers`` DataLoader processes (0: here). Pieces of one chunk come in
    order; chunks read by different workers interleave."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if not chunks:
        return iter(())
    _freeze_before_fork(workers)
    loader = torch.utils.data.DataLoader(ChunkStream(source, chunks), batch_size=None,
                                         num_workers=min(workers, len(chunks)), collate_fn=_keep,
                                         prefetch_factor=2 if workers else None)
    return iter(loader)


def _freeze_before_fork(workers: int) -> None:
    """Before DataLoader workers fork: move every live object out of the garbage collector's reach (``gc.freeze``),
    so a worker's collections do not write to, and so copy, the parent's pages (the listing's per-file tuples:
    ~40 MB at 200K files that every worker would otherwise duplicate). Objects made later are collected as usual."""
    if workers > 0:
        import gc

        gc.freeze()


def _keep(piece):
    return piece


class _WholeChunks(torch.utils.data.Dataset):
    """Chunk i of a source as the list of its Pieces: a map-style dataset, so a DataLoader hands chunks back in
    index order, holding at most workers x prefetch chunks."""

    def __init__(self, source: Source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source.chunks)

    def __getitem__(self, i: int) -> list:
        return list(self.source.read(self.source.chunks[i]))


def in_order(source: Source, workers: int = 0) -> Iterator[Piece]:
    """Every Piece of the source in slot order, for passes that hash or write the rows in order: chunk by chunk,
    each decoded whole by one of ``workers`` DataLoader processes (0: here, a piece at a time); at most about
    2 x ``workers`` decoded chunks wait at once."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if workers == 0 or len(source.chunks) < 2:
        for c in source.chunks:
            yield from source.read(c)
        return
    _freeze_before_fork(workers)
    loader = torch.utils.data.DataLoader(_WholeChunks(source), batch_size=None, shuffle=False,
                                         num_workers=min(workers, len(source.chunks)), collate_fn=_keep,
                                         prefetch_factor=2)
    for pieces in loader:
        yield from pieces


@dataclass
class Collected:
    """Every readable row of a source in slot order: names, slots int64 (N,), class ids int64 (N,) or None, images
    uint8 (N, C, H, W) or None (when not kept), skips [(name, reason)]."""

    names: list
    slots: np.ndarray
    class_ids: Optional[np.ndarray]
    images: Optional[np.ndarray]
    skipped: list


def collect(source: Source, workers: int = 0, keep_images: bool = False, progress=None) -> Collected:
    """Read the whole source once: what is readable (and, with ``keep_images``, the pixels), in slot order (workers
    interleave chunks); ``progress(k)``: k more slots handled. A DataError when nothing can be read."""
    pieces = []
    for piece in iterate(source, source.chunks, workers):
        pieces.append(piece if keep_images else Piece(piece.chunk, piece.slots, piece.names, None, piece.class_ids,
                                                      piece.skipped, piece.last))
        if progress is not None:
            progress(len(piece.slots) + len(piece.skipped))
    skipped = [s for p in pieces for s in p.skipped]
    kept = [p for p in pieces if len(p.slots)]
    if not kept:
        first = skipped[0] if skipped else ("?", "nothing listed")
        raise DataError(f"--data {source.spec}: none of the {source.slots} images could be read (first problem: "
                        f"{first[0]}: {first[1]})")
    slots = np.concatenate([p.slots for p in kept])
    order = np.argsort(slots, kind="stable")
    names = [n for p in kept for n in p.names]
    labelled = all(p.class_ids is not None for p in kept)
    return Collected([names[i] for i in order], slots[order],
                     np.concatenate([p.class_ids for p in kept])[order] if labelled else None,
                     np.concatenate([p.images for p in kept])[order] if keep_images else None, skipped)


def class_names_for(source: Source, class_ids: Optional[np.ndarray]) -> list:
    """The source's class names, or for labels without names (tar .cls, plain integer columns) their numbers."""
    if class_ids is None or not len(class_ids):
        return []
    if len(source.class_names) > int(class_ids.max()):
        return list(source.class_names)
    return [str(i) for i in range(int(class_ids.max()) + 1)]
