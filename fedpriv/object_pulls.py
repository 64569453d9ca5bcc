"""Ask again for a message's objects within a fraction of a second, not after 1, 2, 4, 8 s.

Flower 1.41 moves a message as a header plus objects (its arrays). A receiver
that asks for an object its sender has not pushed yet gets "unavailable" and
waits before asking again: 1 s, then 2, 4, 8 and 10 s (``PULL_INITIAL_BACKOFF``,
``PULL_BACKOFF_CAP``). Three hops of a deployed round pull this way: the
SuperNode from the SuperLink, the ClientApp from its SuperNode (its task starts
before the SuperNode holds the arrays) and the coordinator's Grid from the
SuperLink. Measured: a forked ClientApp's training message entered its handler
7 to 15 s after the process started (1+2+4 or 1+2+4+8 s of back-off), a
key-exchange message (no arrays) within a second. ``install`` wraps a module's
``pull_objects`` so that it starts at 0.05 s and never waits more than 0.5 s
between tries; everything else (concurrency, time limit, tries) is Flower's.
Each extra try is one small local or LAN request.
"""

from __future__ import annotations

import functools
from types import ModuleType

INITIAL_BACKOFF_S = 0.05
BACKOFF_CAP_S = 0.5


def prompt(pull_objects):
    """``pull_objects`` with at most ``INITIAL_BACKOFF_S`` / ``BACKOFF_CAP_S`` between tries."""
    if getattr(pull_objects, "fedpriv_prompt", False):
        return pull_objects

    @functools.wraps(pull_objects)
    def pull(object_ids, pull_object_fn, **options):
        options["initial_backoff"] = min(options.get("initial_backoff", INITIAL_BACKOFF_S), INITIAL_BACKOFF_S)
        options["backoff_cap"] = min(options.get("backoff_cap", BACKOFF_CAP_S), BACKOFF_CAP_S)
        return pull_objects(object_ids, pull_object_fn, **options)

    pull.fedpriv_prompt = True
    return pull


def install(module: ModuleType) -> None:
    """Replace ``module.pull_objects`` (Flower's, as that module imported it) by its prompt version."""
    original = getattr(module, "pull_objects", None)
    if not callable(original):
        raise SystemExit(
            f"fedpriv: {module.__name__} has no pull_objects in this Flower release (flwr 1.41.x expected)"
        )
    module.pull_objects = prompt(original)
