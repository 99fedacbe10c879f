"""Live sliders (issue 26.3): each visitor sees one grid, the one they asked for last. Every run the page starts
(a slider release or Generate) carries the browser's clock at the moment of the action (``issued``, ms); the
newest run of a visitor stops the older ones at their next sampler step, and a run that reaches the server after
a newer one (requests can overtake each other) stops before its first. A stopped run leaves the page to the newer
one. Runs of every visitor then take the sampling lock in turn, so torch never samples two grids at once on the
CPU's cores. Callers without a session or a clock (the HTTP API, scripts) stop nobody and are never stopped here.
No gradio: the UI hands in Gradio's session hash as the visitor."""
from __future__ import annotations

import itertools
import threading
from typing import Hashable, Optional


KEEP_VISITORS = 1000  # visitors whose last clock is kept; one a visitor forgot orders nothing anyway


def acquire(lock: threading.Lock, stop: threading.Event, poll: float = 0.05) -> bool:
    """Take ``lock`` unless ``stop`` is set first (a run superseded while it waits leaves at once): whether the
    lock was taken."""
    while not stop.is_set():
        if lock.acquire(timeout=poll):
            return True
    return False


class RunSlots:
    """Per visitor: the newest run's clock and stop event. ``claim`` a slot for a new run, ``superseded`` asks
    whether a newer run took it (then the stopped run shows nothing: its 'Stopped' must not overwrite the page)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._slots: dict = {}  # visitor -> (issued, stop event)
        self._anonymous = itertools.count()

    def claim(self, visitor: Optional[Hashable], issued: Optional[float]) -> tuple:
        """(key, stop event) of a run for ``visitor`` issued at browser time ``issued`` (ms). Without either,
        a key of its own. The older run of the visitor is stopped; a run older than the visitor's newest gets
        a stop event that is set already."""
        stop = threading.Event()
        if visitor is None or issued is None:
            return ("anonymous", next(self._anonymous)), stop
        with self._lock:
            old = self._slots.get(visitor)
            if old is not None and old[0] > issued:  # a newer run arrived first
                stop.set()
                return visitor, stop
            self._slots[visitor] = (issued, stop)
        if old is not None and old[1] is not None:  # None: the visitor's last run has ended
            old[1].set()
        return visitor, stop

    def superseded(self, key: Hashable, stop: threading.Event) -> bool:
        """Whether a newer run of the visitor holds the slot (always False for a key of its own)."""
        with self._lock:
            slot = self._slots.get(key)
            return slot is not None and slot[1] is not stop

    def release(self, key: Hashable, stop: threading.Event) -> None:
        """A run has ended: the slot stays (its clock orders later arrivals) but holds no running run."""
        with self._lock:
            slot = self._slots.get(key)
            if slot is not None and slot[1] is stop:
                self._slots[key] = (slot[0], None)
            if len(self._slots) > KEEP_VISITORS:  # forget the visitors with no run (the oldest first)
                idle = [k for k, (_, s) in self._slots.items() if s is None]
                for k in idle[:len(self._slots) - KEEP_VISITORS]:
                    del self._slots[k]

    def running(self) -> int:
        """How many visitors have a run that has not ended."""
        with self._lock:
            return sum(1 for _, stop in self._slots.values() if stop is not None)
