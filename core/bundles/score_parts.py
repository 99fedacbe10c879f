"""Minority scores of a streamed source, written chunk by chunk (issue 28): bounded memory, resumable, shared
between processes.

Each chunk of a ``stream.Source`` is scored in batches of consecutive rows and written, atomically, as one part
file ``PARTS/chunk-NNNNNN.json`` (its slots, names, scores, class ids and skips) as soon as its last row is
scored. Process r of P scores the chunks whose index is r mod P, so which process ran a chunk changes nothing in
it: P processes give one process's table. A run killed at any moment leaves complete parts only; ``resume``
keeps those (when ``PARTS/run.json`` records the same source and settings) and scores the rest. ``merge`` reads
the parts back in chunk order: the table in slot order, as an uninterrupted run writes it.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from core.bundles.stream import Piece, Source, class_names_for, iterate
from core.errors import DataError

RUN_FILE = "run.json"


def part_path(parts: Path, index: int) -> Path:
    return Path(parts) / f"chunk-{index:06d}.json"


def prepare(parts: Path, run: dict, resume: bool) -> set:
    """Make ``parts`` ready for a run described by ``run`` (source fingerprint and settings): with ``resume``,
    the indices of the chunks already done (a DataError if the parts were written for another run); without,
    an empty folder. Call on one process only."""
    parts = Path(parts)
    from core.nets.checkpoint import atomic_write_json

    if resume and (parts / RUN_FILE).is_file():
        try:
            old = json.loads((parts / RUN_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old != json.loads(json.dumps(run)):
            raise DataError(f"--resume: the parts in {parts} were written for other data or settings; rerun "
                            f"without --resume (it starts over)")
        return done_chunks(parts)
    if parts.exists():
        shutil.rmtree(parts)
    parts.mkdir(parents=True)
    atomic_write_json(parts / RUN_FILE, run)
    return set()


def done_chunks(parts: Path) -> set:
    """Indices of the chunks with a complete part file (a torn or foreign file counts as not done)."""
    out = set()
    for f in Path(parts).glob("chunk-*.json"):
        try:
            part = json.loads(f.read_text())
            if isinstance(part, dict) and part.get("complete") is True:
                out.add(int(part["chunk"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def score_source(model, source: Source, settings, distance, parts: Path, done: set = frozenset(), rank: int = 0,
                 world: int = 1, batch_size: int = 64, workers: int = 0,
                 progress: Optional[Callable[[int], None]] = None) -> int:
    """Score this process's chunks of ``source`` not in ``done`` and write each as a part: the rows scored.
    ``progress(k)``: k more slots were handled (scored or skipped)."""
    from core.maths.score import minority_scores
    from core.nets.checkpoint import atomic_write_json

    mine = [c for c in source.chunks if c.index % world == rank and c.index not in done]
    open_: dict = {}  # chunk index -> {"rows": [Piece...] not yet scored, "out": [(slots, names, scores, cls)]}
    scored = 0

    def flush(state, everything: bool):
        nonlocal scored
        pending = state["rows"]
        n = sum(len(p.slots) for p in pending)
        while n >= batch_size or (everything and n > 0):
            take = min(batch_size, n)
            batch, pending = _split(pending, take)
            images = torch.from_numpy(np.ascontiguousarray(np.concatenate([p.images for p in batch])))
            slots = np.concatenate([p.slots for p in batch])
            cls = None if batch[0].class_ids is None else np.concatenate([p.class_ids for p in batch])
            s = minority_scores(model, images, torch.from_numpy(slots), settings, distance,
                                None if cls is None else torch.from_numpy(cls), batch_size=take)
            state["out"].append((slots, [nm for p in batch for nm in p.names], s, cls))
            scored += take
            n -= take
        state["rows"] = pending

    for piece in iterate(source, mine, workers):
        state = open_.setdefault(piece.chunk, {"rows": [], "out": [], "skipped": []})
        state["skipped"] += piece.skipped
        if len(piece.slots):
            state["rows"].append(piece)
        flush(state, piece.last)
        if progress is not None:
            progress(len(piece.slots) + len(piece.skipped))
        if piece.last:
            del open_[piece.chunk]
            atomic_write_json(part_path(parts, piece.chunk), _part(piece.chunk, state))
    return scored


def _split(pieces: list, take: int) -> tuple:
    """The first ``take`` rows of ``pieces`` as Pieces, and the rest."""
    head, rest = [], list(pieces)
    while take > 0:
        p = rest.pop(0)
        if len(p.slots) <= take:
            head.append(p)
            take -= len(p.slots)
            continue
        cut = lambda a: None if a is None else a[:take]  # noqa: E731
        tail = lambda a: None if a is None else a[take:]  # noqa: E731
        head.append(Piece(p.chunk, p.slots[:take], p.names[:take], p.images[:take], cut(p.class_ids)))
        rest.insert(0, Piece(p.chunk, p.slots[take:], p.names[take:], p.images[take:], tail(p.class_ids)))
        take = 0
    return head, rest


def _part(index: int, state: dict) -> dict:
    out = state["out"]
    cls = [c for *_, c in out]
    return {"chunk": index, "complete": True,
            "slots": [int(v) for s, *_ in out for v in s],
            "names": [nm for _, names, *_ in out for nm in names],
            "scores": [float(v) for _, _, s, _ in out for v in s],
            "class_ids": None if not out or cls[0] is None else [int(v) for c in cls for v in c],
            "skipped": [list(x) for x in state["skipped"]]}


@dataclass(frozen=True)
class Merged:
    """The parts read back in slot order: names, float64 scores (N,), class ids (N,) or None with their names,
    skips [(name, reason)]."""

    names: list
    scores: np.ndarray
    class_ids: Optional[np.ndarray]
    class_names: list
    skipped: list


def merge(parts: Path, source: Source) -> Merged:
    """Every chunk's part, in chunk order (a missing one is a DataError: a process did not finish)."""
    names, scores, cls, skipped = [], [], [], []
    missing = [c.index for c in source.chunks if not part_path(parts, c.index).is_file()]
    if missing:
        raise DataError(f"{len(missing)} chunk(s) of {len(source.chunks)} have no scores in {parts} (first: "
                        f"{source.chunks[missing[0]].name}); rerun with --resume to score them")
    for c in source.chunks:
        part = json.loads(part_path(parts, c.index).read_text())
        names += part["names"]
        scores += part["scores"]
        if part["class_ids"] is not None:
            cls += part["class_ids"]
        skipped += [tuple(s) for s in part["skipped"]]
    if not names:
        first = skipped[0] if skipped else ("?", "?")
        raise DataError(f"--data {source.spec}: none of the {source.slots} images could be read (first problem: "
                        f"{first[0]}: {first[1]})")
    class_ids = np.array(cls, dtype=np.int64) if cls and len(cls) == len(names) else None
    return Merged(names, np.array(scores, dtype=np.float64), class_ids, class_names_for(source, class_ids), skipped)
