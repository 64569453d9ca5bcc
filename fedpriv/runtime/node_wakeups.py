"""Waits inside ``fedpriv-supernode`` that end when something arrives, not at the next poll.

A SuperNode in subprocess isolation talks to its SuperExec and its ClientApp
processes over its local Runtime API (HTTP), and each side polled the other:
the SuperExec asked for a task every 0.2 s (``AcquireTask``), and the SuperNode
loop looked for its ClientApp's reply every 0.1 s. In a SecAgg+ round (five
exchanges) each poll added up to one interval to every exchange, and the polls
themselves (HTTP requests both ways) took CPU from training on a shared machine.

Here the SuperNode process notes every arrival (a message stored for its
ClientApps, a reply or an object pushed back by one) in a ``Wakeups`` counter:

- ``AcquireTask`` with nothing pending holds the request up to
  ``LONG_POLL_S`` and answers as soon as a task is created (a long poll); the
  SuperExec that ``fedpriv-supernode`` starts is told so (``LONG_POLL_ENV``)
  and asks again at once instead of sleeping;
- the SuperNode loop's short local waits end at the next arrival;
- after a pull that its SuperLink held (``fedpriv-superlink``, fedpriv/runtime/superlink.py)
  the loop asks again at once (``PullClock``).

Every wait keeps an upper bound (1 s for the long poll, Flower's own 0.5 s for
the local waits), so a missed wake-up costs at most what Flower's poll did,
never a hang.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fedpriv.runtime.wakeups import Wakeups, held, noting

LONG_POLL_S = 1.0  # the longest an AcquireTask with nothing to hand out is held
LONG_POLL_ENV = "FEDPRIV_TASK_LONG_POLL"  # set for the SuperExec that fedpriv-supernode starts
# Runtime API handlers after which something may be waiting: a reply, an object of it, a message to send
ARRIVALS = ("push_task_output", "push_messages", "push_object")


WAKEUPS = Wakeups()


def long_polling(acquire_task: Callable, wakeups: Wakeups = WAKEUPS, hold_s: float = LONG_POLL_S) -> Callable:
    """Flower's ``acquire_task`` handler, holding an empty answer until a task arrives or ``hold_s`` passed
    (not when the SuperExec asks for no task type: it has no room for one)."""
    acquire = held(
        acquire_task,
        wakeups,
        hold_s=hold_s,
        empty=lambda response: not response.HasField("task"),
        may_hold=lambda request: bool(request.supported_task_types),
    )
    acquire.fedpriv_long_poll = True
    return acquire


class LocalWaits:
    """The SuperNode loop's local waits (its ClientApp's reply, that reply's objects): over at the next arrival.

    The loop checks, then sleeps; an arrival since the previous wait ended (during the check) ends this one at
    once, so none is missed between a check and its sleep.
    """

    def __init__(self, longest_s: float, wakeups: Wakeups = WAKEUPS) -> None:
        self.longest_s = longest_s
        self.wakeups = wakeups
        self.seen = wakeups.count

    def sleep(self, seconds: float) -> None:
        self.seen = self.wakeups.wait_past(self.seen, min(seconds, self.longest_s))


class PullClock:
    """How long the SuperNode loop's last pull from the SuperLink took: a SuperLink that held it (fedpriv-superlink,
    fedpriv/runtime/superlink.py) already waited for the node, so its idle wait is that much shorter."""

    def __init__(self) -> None:
        self.last_s = 0.0

    def timed(self, pull: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            started = time.monotonic()
            try:
                return pull(*args, **kwargs)
            finally:
                self.last_s = time.monotonic() - started

        wrapper.fedpriv_timed = True
        wrapper.__wrapped__ = pull
        return wrapper


PULL_CLOCK = PullClock()


def install(runtime_handlers, start_client_internal, wakeups: Wakeups = WAKEUPS, clock: PullClock = PULL_CLOCK) -> None:
    """Note arrivals in the SuperNode's Runtime API handlers and its message store; long-poll ``acquire_task``."""
    for module, name in [(runtime_handlers, n) for n in (*ARRIVALS, "acquire_task")] + [
        (start_client_internal, "_pull_and_store_message")
    ]:
        if not callable(getattr(module, name, None)):
            raise SystemExit(
                f"fedpriv-supernode: {module.__name__} has no `{name}` in this Flower release; run flower-supernode"
                " instead"
            )
    for name in ARRIVALS:
        handler = getattr(runtime_handlers, name)
        if not getattr(handler, "fedpriv_noting", False):
            setattr(runtime_handlers, name, noting(handler, wakeups))
    if not getattr(runtime_handlers.acquire_task, "fedpriv_long_poll", False):
        runtime_handlers.acquire_task = long_polling(runtime_handlers.acquire_task, wakeups)
    # a message pulled from the SuperLink and stored (its task created): the SuperExec's long poll answers
    pull = start_client_internal._pull_and_store_message
    if not getattr(pull, "fedpriv_noting", False):  # it returns the message's run id, None when there was none
        pull = noting(clock.timed(pull), wakeups, when=lambda run_id: run_id is not None)
        start_client_internal._pull_and_store_message = pull
