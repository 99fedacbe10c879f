"""Several bundles in one app (issue 17): the bundles chosen on the command line (or every bundle under
assets/, MRI first), those that fail their checks skipped with the reason, and an LRU pool that lets at most
``capacity`` bundles hold their weights at once. No gradio import."""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from core.errors import MinorityError

from .handlers import DEFAULT_BUNDLE, Studio

ASSETS = DEFAULT_BUNDLE.parent
POOL_CAPACITY = 2  # bundles whose models are in memory at once (measured in README: app memory)


class Pool:
    """Least-recently-used set of loaded studios: touching one makes it the newest; beyond ``capacity`` the
    oldest is unloaded (its next use loads it again)."""

    def __init__(self, capacity: int = POOL_CAPACITY):
        if capacity < 1:
            raise ValueError(f"pool capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._loaded: "OrderedDict[int, Studio]" = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0

    def touch(self, studio: Studio) -> None:
        """Make ``studio`` the newest and unload the oldest others beyond ``capacity``. Called before a studio
        loads (its slot is taken then, so the old bundle goes first and a concurrent load counts it: never
        capacity + 1 in memory) and on every use."""
        with self._lock:
            self._loaded[id(studio)] = studio
            self._loaded.move_to_end(id(studio))
            while len(self._loaded) > self.capacity:
                _, old = self._loaded.popitem(last=False)
                old.unload()
                self.evictions += 1

    def loaded(self) -> list:
        """Names of the studios holding weights now, oldest first."""
        with self._lock:
            return [s.name for s in self._loaded.values() if s.loaded]


@dataclass
class Library:
    """The app's bundles in display order, and the ones refused at start-up: [(path, reason)]."""

    studios: list
    skipped: list = field(default_factory=list)
    pool: Optional[Pool] = None

    @classmethod
    def open(cls, paths: list, device: str = "cpu", capacity: int = POOL_CAPACITY) -> "Library":
        """Check every bundle's manifest and hashes (no weights loaded); a damaged one is skipped, not fatal,
        unless none is left."""
        pool = Pool(capacity)
        studios, skipped, names = [], [], set()
        for p in paths:
            st = Studio(p, device, pool=pool)
            try:
                name = st.name
            except (MinorityError, OSError) as e:
                skipped.append((str(p), str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__))
                continue
            if name in names:
                skipped.append((str(p), f"a bundle named {name!r} is already open"))
                continue
            names.add(name)
            studios.append(st)
        if not studios:
            why = "; ".join(f"{p}: {r}" for p, r in skipped) or "no bundle given"
            raise MinorityError(f"no usable bundle ({why})")
        return cls(studios, skipped, pool)

    @staticmethod
    def default_paths(root: Path = ASSETS) -> list:
        """Every folder under ``root`` with a manifest.json, the MRI bundle first, then by name."""
        found = sorted(p.parent for p in Path(root).glob("*/manifest.json"))
        return sorted(found, key=lambda p: (p.name != DEFAULT_BUNDLE.name, p.name))

    def names(self) -> list:
        return [s.name for s in self.studios]

    def get(self, name: str) -> Studio:
        for s in self.studios:
            if s.name == name:
                return s
        raise MinorityError(f"unknown bundle {name!r}; open: {', '.join(self.names())}")
