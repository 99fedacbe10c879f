"""Issue 26.3: the live sliders' ordering (app.live): a visitor's newest run, by the browser's clock, stops the
older ones, whatever order the requests arrive in; callers without a clock (the API) are left alone."""
import threading

import pytest

from app import handlers as h
from app.live import KEEP_VISITORS, RunSlots, acquire


def test_a_newer_run_stops_the_older_one_and_takes_the_slot():
    slots = RunSlots()
    k1, first = slots.claim("v", 100.0)
    k2, second = slots.claim("v", 200.0)
    assert first.is_set() and not second.is_set()
    assert slots.superseded(k1, first) and not slots.superseded(k2, second)


def test_a_run_that_arrives_after_a_newer_one_is_stopped_before_it_starts():
    """A blur's release issued before a Generate click can reach the server after it (seen in Chromium)."""
    slots = RunSlots()
    _, click = slots.claim("v", 200.0)
    key, late = slots.claim("v", 150.0)
    assert late.is_set() and not click.is_set() and slots.superseded(key, late)


def test_runs_without_a_clock_or_a_visitor_stop_nobody():
    slots = RunSlots()
    _, browser = slots.claim("v", 100.0)
    for visitor, issued in (("v", None), (None, 300.0), (None, None)):
        key, run = slots.claim(visitor, issued)
        assert not run.is_set() and not slots.superseded(key, run)
    assert not browser.is_set()


def test_other_visitors_are_untouched_and_an_ended_run_keeps_its_clock():
    slots = RunSlots()
    _, a = slots.claim("a", 100.0)
    key_b, b = slots.claim("b", 500.0)
    assert not a.is_set() and slots.running() == 2
    slots.release(key_b, b)
    assert slots.running() == 1
    _, stale = slots.claim("b", 400.0)  # older than b's finished run: still ordered by b's clock
    assert stale.is_set()
    key, again = slots.claim("b", 600.0)  # a newer run after b's ended (a second Generate): runs
    assert not again.is_set() and not slots.superseded(key, again) and slots.running() == 2


def test_the_slots_forget_idle_visitors_beyond_the_bound():
    slots = RunSlots()
    for i in range(KEEP_VISITORS + 50):
        key, stop = slots.claim(f"v{i}", 1.0)
        slots.release(key, stop)
    assert len(slots._slots) == KEEP_VISITORS


def test_acquire_gives_up_when_the_run_is_stopped_while_it_waits():
    lock, stop = threading.Lock(), threading.Event()
    lock.acquire()
    threading.Timer(0.2, stop.set).start()
    assert acquire(lock, stop) is False
    lock.release()
    assert acquire(lock, threading.Event()) is True


@pytest.fixture(scope="module")
def studio():
    return h.Studio(h.DEFAULT_BUNDLE)


def test_the_older_of_two_runs_of_a_visitor_shows_nothing_and_the_newer_finishes(studio):
    """Handler level: the first run yields a preview, a newer run of the same visitor starts; the first ends
    with one all-unchanged output (its 'Stopped' would overwrite the newer run's status), the newer is Done."""
    args = (49, 2.5, 20, 2, 4, "DDIM", "minority guidance", 3.0, 3, 5, 0, None)
    old = h.on_generate(studio, *args, 100.0, "visitor")
    assert next(old)[2].startswith("Sampling")
    new = list(h.on_generate(studio, *args[:1], 1.0, *args[2:], 200.0, "visitor"))
    rest = list(old)
    assert rest[-1] == (h.UNCHANGED,) * 5, rest[-1]
    assert new[-1][2].startswith("Done") and "w = 1" in new[-1][2]
    assert studio.runs.running() == 0
    after = list(h.on_generate(studio, *args, 300.0, "visitor"))  # a third run once both have ended
    assert after[-1][2].startswith("Done"), after[-1][2]


def test_a_nonsense_clock_from_the_api_is_ignored(studio):
    args = (49, 2.5, 5, 1, 4, "DDIM", "minority guidance", 3.0, 3, 5, 0, None)
    for issued in ("soon", float("nan"), [1], 0, -5.0):
        assert list(h.on_generate(studio, *args, issued, "visitor"))[-1][2].startswith("Done")
