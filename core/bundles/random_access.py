"""Random access to a streamed source (issue 28): ``train-classifier`` draws its minibatches by index, so it
reads one slot at a time instead of the source in order. ``RandomAccess`` gives every slot's name and class id
from the listing and decodes one slot's image on demand; ``LazyImages`` is indexed like the uint8 image tensor
``train_classifier`` used to hold, decoding what it is asked for behind a bounded least-recently-used cache."""
from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from core.bundles.data import is_nifti, load_image, load_nifti_slices
from core.bundles.stream import TAR_IMAGE_EXTS, Chunk, Source, _encoded, _load_dataset


class RandomAccess:
    """Names, class ids and decoded images of a source's slots by number, without reading it in order: a folder
    file (a NIfTI volume's band decoded once and its slices cached), a dataset row, a Parquet row (its row
    group read once, the last one kept), a tar sample (its member read by offset from tarfile's index)."""

    def __init__(self, source: Source):
        self.source = source
        self._starts = np.array([c.start for c in source.chunks], dtype=np.int64)
        self._ds = None
        self._group = (None, None)
        self._tar_index: dict = {}
        if source.kind == "folder":  # every file's path, first slot and first band slice, as arrays
            self._rels = [rel for c in source.chunks for rel in c.ref.rels]
            self._file_starts = np.concatenate([c.ref.starts for c in source.chunks]).astype(np.int64)
            self._los = np.concatenate([c.ref.los for c in source.chunks]).astype(np.int64)

    def _chunk(self, slot: int) -> Chunk:
        return self.source.chunks[int(np.searchsorted(self._starts, slot, side="right")) - 1]

    def names(self) -> list:
        """The name of every slot, in slot order (what a score table's path column holds for it)."""
        src, out = self.source, []
        for c in src.chunks:
            if src.kind == "folder":
                for rel, start, _, lo in c.ref:
                    out += [f"{rel}#z{lo + k:03d}" for k in range(self._width(start))] if is_nifti(rel) else [rel]
            elif src.kind == "datasets":
                out += [f"row {c.start + k}" for k in range(c.size)]
            elif src.kind == "parquet":
                out += [f"{Path(c.ref[0]).name} row {c.start + k}" for k in range(c.size)]
            else:
                out += [f"{Path(c.ref[0]).name}/{key}" for key in c.ref[1]]
        return out

    def _width(self, start: int) -> int:
        """Slots of the folder file whose first slot is ``start``."""
        i = int(np.searchsorted(self._file_starts, start, side="left"))
        nxt = self._file_starts[i + 1] if i + 1 < len(self._file_starts) else self.source.slots
        return int(nxt - start)

    def class_ids(self) -> Optional[np.ndarray]:
        """Every slot's class id (N,), or None for unlabelled data."""
        src = self.source
        if src.kind == "folder":
            if not src.class_names:
                return None
            return np.concatenate([[cls] * self._width(start) for c in src.chunks
                                   for _, start, cls, _ in c.ref]).astype(np.int64)
        label = src.columns[1]
        if not label:
            return None
        if src.kind == "datasets":
            return np.array(self._dataset()[label], dtype=np.int64)
        if src.kind == "parquet":
            import pyarrow.parquet as pq

            files = list(dict.fromkeys(c.ref[0] for c in src.chunks))
            return np.concatenate([np.array(pq.read_table(f, columns=[label])[label].to_pylist(), dtype=np.int64)
                                   for f in files])
        out = []
        for c in src.chunks:
            index = self._index(c.ref[0])
            for key in c.ref[1]:
                text = self._member(c.ref[0], index.get((key, "cls"))).decode("utf-8", "replace").strip()
                out.append(int(text) if text.isdigit() else -1)
        return np.array(out, dtype=np.int64)

    def image(self, slot: int) -> dict:
        """{slot: uint8 (C, H, W)} for the image at ``slot`` (a NIfTI volume: all its band's slices); an
        unreadable image is an InvalidImageError naming it."""
        src = self.source
        if src.kind == "folder":
            i = int(np.searchsorted(self._file_starts, slot, side="right")) - 1
            rel, start, lo = self._rels[i], int(self._file_starts[i]), int(self._los[i])
            path = Path(src.spec) / rel
            if not is_nifti(rel):
                return {slot: load_image(path, src.size, src.channels)}
            return {start + (z - lo): a if src.channels == 1 else np.repeat(a, 3, 0)
                    for z, a in load_nifti_slices(path, src.size, src.band)}
        c = self._chunk(slot)
        name = f"row {slot}"
        if src.kind == "datasets":
            value = self._dataset()[int(slot)][src.columns[0]]
        elif src.kind == "parquet":
            group = self._group  # one read of the attribute: threads of LazyImages may replace it meanwhile
            if group[0] != c.index:
                import pyarrow.parquet as pq

                f, g = c.ref
                group = (c.index, pq.ParquetFile(f).read_row_group(g, columns=[src.columns[0]]).to_pydict())
                self._group = group
            value, name = group[1][src.columns[0]][slot - c.start], f"{Path(c.ref[0]).name} row {slot}"
        else:
            key = c.ref[1][slot - c.start]
            index = self._index(c.ref[0])
            ext = next((e for e in TAR_IMAGE_EXTS if (key, e) in index), None)
            name = f"{Path(c.ref[0]).name}/{key}"
            value = self._member(c.ref[0], index.get((key, ext)))
        return {slot: load_image(name, src.size, src.channels, data=_encoded(value, name))}

    def _dataset(self):
        if self._ds is None:
            import datasets

            ds = _load_dataset(self.source.spec)
            if type(ds.features[self.source.columns[0]]).__name__ == "Image":
                ds = ds.cast_column(self.source.columns[0], datasets.Image(decode=False))
            self._ds = ds
        return self._ds

    def _index(self, shard: str) -> dict:
        """{(key, extension): (offset, size)} of a shard's members (tarfile reads headers only)."""
        if shard not in self._tar_index:
            from webdataset.tariterators import base_plus_ext

            index = {}
            try:
                with tarfile.open(shard, "r:") as tf:
                    for m in tf:
                        key, ext = base_plus_ext(m.name)
                        if m.isfile() and key is not None:
                            index[(key, ext.lower())] = (m.offset_data, m.size)
            except (tarfile.TarError, OSError, EOFError):
                pass
            self._tar_index[shard] = index
        return self._tar_index[shard]

    @staticmethod
    def _member(shard: str, where) -> bytes:
        if where is None:
            return b""
        with open(shard, "rb") as f:
            f.seek(where[0])
            return f.read(where[1])


class LazyImages:
    """uint8 images (N, C, H, W) indexed like a tensor (``images[LongTensor]``) but decoded on demand from
    ``slots`` of a source, with at most ``cache_bytes`` of decoded images kept (least recently used go first):
    what ``train_classifier`` indexes instead of a tensor when the data is streamed."""

    def __init__(self, access: RandomAccess, slots: np.ndarray, cache_bytes: int = 1 << 30, threads: int = 1):
        from collections import OrderedDict

        self.access, self.slots = access, np.asarray(slots, dtype=np.int64)
        src = access.source
        self.shape = (len(self.slots), src.channels, src.size, src.size)
        self.cache_bytes, self.threads = int(cache_bytes), max(1, int(threads))
        self._cache: OrderedDict = OrderedDict()
        self.decoded = 0  # images decoded so far (a cache hit decodes nothing)

    def __len__(self) -> int:
        return len(self.slots)

    def __getitem__(self, idx) -> torch.Tensor:
        idx = np.asarray(torch.as_tensor(idx).reshape(-1), dtype=np.int64)
        want = [int(self.slots[i]) for i in idx]
        if not want:
            return torch.zeros((0,) + self.shape[1:], dtype=torch.uint8)
        missing = list(dict.fromkeys(s for s in want if s not in self._cache))
        if missing:
            if self.threads > 1 and len(missing) > 1:
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(self.threads) as pool:
                    found = list(pool.map(self.access.image, missing))
            else:
                found = [self.access.image(s) for s in missing]
            got = {}
            for f in found:
                got.update(f)
            self.decoded += len(missing)
            out = np.stack([self._cache[s] if s in self._cache else got[s] for s in want])
            for s, a in got.items():
                self._put(s, a)
        else:
            out = np.stack([self._cache[s] for s in want])
        for s in want:
            if s in self._cache:
                self._cache.move_to_end(s)
        return torch.from_numpy(out)

    def _put(self, slot: int, arr: np.ndarray) -> None:
        self._cache[slot] = arr
        per = arr.nbytes
        while len(self._cache) * per > self.cache_bytes and self._cache:
            self._cache.popitem(last=False)
