"""fedpriv-supernode's waits end when something arrives: the SuperExec's long poll, the loop's local waits."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from fedpriv.runtime import node_wakeups
from fedpriv.runtime.node_wakeups import LocalWaits, PullClock, long_polling
from fedpriv.runtime.wakeups import Wakeups, noting


class Response:
    def __init__(self, task=None) -> None:
        self.task = task

    def HasField(self, name: str) -> bool:  # noqa: N802 - protobuf's name
        return name == "task" and self.task is not None


class PendingTasks:
    """Flower's ``acquire_task`` over a list that another thread fills; counts the lookups."""

    def __init__(self) -> None:
        self.tasks: list[str] = []
        self.lookups = 0

    def acquire_task(self, request, state):
        self.lookups += 1
        return Response(self.tasks.pop(0) if self.tasks else None)


REQUEST = SimpleNamespace(supported_task_types=["clientapp"])


def later(seconds: float, action) -> threading.Thread:
    thread = threading.Timer(seconds, action)
    thread.start()
    return thread


def test_an_empty_acquire_task_is_answered_when_a_task_arrives_not_at_the_next_poll():
    wakeups, pending = Wakeups(), PendingTasks()
    acquire = long_polling(pending.acquire_task, wakeups, hold_s=5.0)
    stored = noting(lambda task: pending.tasks.append(task), wakeups)  # the SuperNode storing a message
    later(0.3, lambda: stored("task-1"))
    started = time.monotonic()
    response = acquire(REQUEST, state=None)
    waited = time.monotonic() - started
    assert response.task == "task-1"
    assert 0.25 < waited < 2.0  # woken by the arrival, well before the 5 s hold
    assert pending.lookups == 2  # one look before the wait, one after the wake-up: no polling in between


def test_an_empty_acquire_task_is_held_at_most_hold_s_and_a_pending_task_is_handed_out_at_once():
    wakeups, pending = Wakeups(), PendingTasks()
    acquire = long_polling(pending.acquire_task, wakeups, hold_s=0.3)
    started = time.monotonic()
    assert acquire(REQUEST, state=None).task is None
    assert 0.29 < time.monotonic() - started < 2.0
    pending.tasks.append("task-2")
    started = time.monotonic()
    assert acquire(REQUEST, state=None).task == "task-2"
    assert time.monotonic() - started < 0.1
    # a SuperExec with no capacity asks for nothing: answered at once, as by Flower
    started = time.monotonic()
    assert acquire(SimpleNamespace(supported_task_types=[]), state=None).task is None
    assert time.monotonic() - started < 0.1


def test_an_arrival_between_the_look_and_the_wait_is_not_missed():
    wakeups, pending = Wakeups(), PendingTasks()

    def look_then_arrival(request, state):
        response = pending.acquire_task(request, state)
        if pending.lookups == 1:  # the task is stored right after the first (empty) look
            pending.tasks.append("task-3")
            wakeups.note()
        return response

    started = time.monotonic()
    assert long_polling(look_then_arrival, wakeups, hold_s=5.0)(REQUEST, state=None).task == "task-3"
    assert time.monotonic() - started < 1.0


def test_local_waits_end_at_an_arrival_and_never_outlast_their_bound():
    wakeups = Wakeups()
    waits = LocalWaits(longest_s=5.0, wakeups=wakeups)
    pushed = noting(lambda: None, wakeups)  # a ClientApp pushing its reply
    later(0.2, pushed)
    started = time.monotonic()
    waits.sleep(0.5 * 10)
    assert 0.15 < time.monotonic() - started < 2.0
    # an arrival during the loop's check (after the last wait ended) ends the next wait at once
    pushed()
    started = time.monotonic()
    waits.sleep(5.0)
    assert time.monotonic() - started < 0.1
    started = time.monotonic()
    LocalWaits(longest_s=0.2, wakeups=wakeups).sleep(3.0)  # nothing arrives: the bound
    assert 0.19 < time.monotonic() - started < 1.5


def test_the_idle_wait_after_a_pull_the_superlink_held_is_shortened_by_the_hold():
    from fedpriv.runtime.supernode import ShortWaits

    clock = PullClock()
    waits = ShortWaits(0.5, clock=clock)
    clock.timed(lambda: time.sleep(0.2))()  # a SuperLink that held the pull 0.2 s
    started = time.monotonic()
    waits.sleep(3)  # Flower's idle wait
    assert 0.2 < time.monotonic() - started < 0.45
    clock.timed(lambda: time.sleep(0.6))()  # held longer than the idle wait (fedpriv-superlink): ask again at once
    started = time.monotonic()
    waits.sleep(3)
    assert time.monotonic() - started < 0.1
    clock.timed(lambda: None)()  # Flower's SuperLink answers at once: the full idle wait
    started = time.monotonic()
    waits.sleep(3)
    assert time.monotonic() - started > 0.45


def test_install_wraps_each_handler_once_and_refuses_a_flower_without_them():
    calls = []
    handlers = SimpleNamespace(__name__="handlers", acquire_task=PendingTasks().acquire_task)
    for name in node_wakeups.ARRIVALS:
        setattr(handlers, name, lambda *a, _n=name: calls.append(_n))
    loop = SimpleNamespace(__name__="loop", _pull_and_store_message=lambda **kw: 7)
    wakeups, clock = Wakeups(), PullClock()
    node_wakeups.install(handlers, loop, wakeups, clock)
    node_wakeups.install(handlers, loop, wakeups, clock)  # a second install wraps nothing twice
    handlers.push_messages()
    assert calls == ["push_messages"] and wakeups.count == 1
    assert loop._pull_and_store_message() == 7 and wakeups.count == 2
    assert handlers.acquire_task.fedpriv_long_poll
    assert not getattr(handlers.acquire_task.__wrapped__, "fedpriv_long_poll", False)  # not wrapped twice
    del handlers.push_object
    with pytest.raises(SystemExit, match="handlers has no `push_object`.*run flower-supernode instead"):
        node_wakeups.install(handlers, loop, wakeups)


def test_the_patch_points_exist_in_this_flower_release():
    """The wrappers work because Flower looks these up by name at call time: the loop its module's global,
    the Runtime API router the handler module's attribute."""
    import importlib
    import inspect

    from flwr.supernode import start_client_internal
    from flwr.supernode.servicer.runtime import runtime_handlers

    assert "_pull_and_store_message" in start_client_internal.start_client_internal.__code__.co_names
    source = inspect.getsource(importlib.import_module("flwr.supercore.routers.runtime.router"))
    for name in (*node_wakeups.ARRIVALS, "acquire_task"):
        assert callable(getattr(runtime_handlers, name))
        assert f"handlers.{name}(" in source, name
