"""Long polls: a held empty answer leaves at the next arrival, never after its hold; a cap on held requests."""

from __future__ import annotations

import threading
import time

import pytest

from fedpriv.runtime.wakeups import Wakeups, held, noting


def test_a_held_empty_answer_leaves_at_the_arrival_and_is_capped():
    wakeups, box = Wakeups(), []
    looks = []

    def handler(request, *, state):
        looks.append(state)
        return list(box)

    pull = held(handler, wakeups, hold_s=5.0, empty=lambda answer: not answer)
    store = noting(box.append, wakeups)
    threading.Timer(0.3, store, args=["message"]).start()
    started = time.monotonic()
    assert pull("node-1", state="s") == ["message"]
    assert 0.25 < time.monotonic() - started < 2.0
    assert looks == ["s", "s"]  # one look, then one after the arrival: nothing in between
    box.clear()
    started = time.monotonic()
    assert held(handler, wakeups, hold_s=0.3, empty=lambda answer: not answer)("node-1", state="s") == []
    assert 0.29 < time.monotonic() - started < 2.0


def test_requests_past_max_held_and_those_that_may_not_wait_are_answered_at_once():
    wakeups = Wakeups()
    pull = held(lambda request: [], wakeups, hold_s=1.0, empty=lambda answer: not answer, max_held=1)
    first = threading.Thread(target=pull, args=["node-1"])
    first.start()
    time.sleep(0.1)  # node-1 holds the only slot
    started = time.monotonic()
    assert pull("node-2") == []
    assert time.monotonic() - started < 0.1
    first.join()
    started = time.monotonic()
    pull("node-3")  # the slot is free again: held
    assert time.monotonic() - started > 0.9
    never = held(lambda request: [], wakeups, hold_s=5.0, empty=lambda a: not a, may_hold=lambda r: False)
    started = time.monotonic()
    assert never("x") == [] and time.monotonic() - started < 0.1


def test_an_arrival_during_a_look_is_not_missed():
    wakeups, looks = Wakeups(), []

    def handler(request):
        looks.append(1)
        if len(looks) == 1:  # the arrival lands while the first look runs
            wakeups.note()
            return None
        return "message"

    started = time.monotonic()
    assert held(handler, wakeups, hold_s=5.0, empty=lambda a: a is None)("node") == "message"
    assert time.monotonic() - started < 0.5


def test_noting_counts_what_arrived_and_what_failed_but_not_an_empty_result():
    wakeups = Wakeups()
    pull = noting(lambda found: found, wakeups, when=lambda run_id: run_id is not None)
    assert pull(None) is None and wakeups.count == 0
    assert pull(42) == 42 and wakeups.count == 1

    def broken():
        raise OSError("disk full")

    with pytest.raises(OSError):
        noting(broken, wakeups)()
    assert wakeups.count == 2
