"""Waits that end when something arrives, for Flower's polling APIs served in this process.

Flower 1.41's processes poll each other over HTTP (a SuperNode asks its
SuperLink for messages, a SuperExec asks its SuperNode for tasks). Where the
side that answers is a fedpriv process, its handler can hold an empty answer
until something arrives (a long poll) instead of making the asker come back:
the answer leaves as soon as there is one, and an idle asker sends a request
per hold instead of several per second. ``Wakeups`` counts arrivals in the
process, ``noting`` wraps the handlers that store them, ``held`` the handler
whose empty answers wait.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Wakeups:
    """A counter of arrivals that threads can wait on (``wait_past``)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.count = 0

    def note(self) -> None:
        with self._changed:
            self.count += 1
            self._changed.notify_all()

    def wait_past(self, seen: int, timeout: float) -> int:
        """Wait until the count is past ``seen`` or ``timeout`` seconds passed; returns the count."""
        with self._changed:
            self._changed.wait_for(lambda: self.count != seen, timeout=max(timeout, 0.0))
            return self.count


def noting(func: Callable, wakeups: Wakeups, when: Callable[[object], bool] | None = None) -> Callable:
    """``func``, then an arrival noted when ``when(result)`` holds (always when it raised: a partial store may
    be what someone waits for)."""

    def wrapper(*args, **kwargs):
        try:
            result = func(*args, **kwargs)
        except BaseException:
            wakeups.note()
            raise
        if when is None or when(result):
            wakeups.note()
        return result

    wrapper.fedpriv_noting = True
    wrapper.__wrapped__ = func
    return wrapper


def held(
    handler: Callable,
    wakeups: Wakeups,
    *,
    hold_s: float,
    empty: Callable[[object], bool],
    may_hold: Callable[[object], bool] = lambda request: True,
    max_held: int | None = None,
) -> Callable:
    """``handler(request, ...)`` whose ``empty`` answers are held until an arrival or ``hold_s`` passed.

    Each arrival makes every held request look again (the handler is called again). ``max_held`` caps how
    many requests wait at once (each holds a server thread); past it, an empty answer leaves at once.
    """
    slots = threading.BoundedSemaphore(max_held) if max_held else None

    def hold(request, *args, **kwargs):
        deadline = time.monotonic() + hold_s
        seen = wakeups.count  # read before looking: an arrival after this wakes the wait below
        response = handler(request, *args, **kwargs)
        if not empty(response) or not may_hold(request):
            return response
        if slots is not None and not slots.acquire(blocking=False):
            return response
        try:
            while empty(response) and (left := deadline - time.monotonic()) > 0:
                seen = wakeups.wait_past(seen, left)
                response = handler(request, *args, **kwargs)
            return response
        finally:
            if slots is not None:
                slots.release()

    hold.fedpriv_held = True
    hold.__wrapped__ = handler
    return hold
