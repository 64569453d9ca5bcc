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
Each extra try is one small local or LAN request. A transient server error
(HTTP 5xx, a dropped connection) is retried the same way, a bounded number of
times, instead of dropping the message (``riding_out_server_errors``).
"""

from __future__ import annotations

import functools
from types import ModuleType

from fedpriv.runtime.patch_points import FLOWER_RANGE

INITIAL_BACKOFF_S = 0.05
BACKOFF_CAP_S = 0.5
SERVER_ERROR_TRIES = 20  # transient server errors ridden out per object (about 8 s at the capped back-off)


def prompt(pull_objects):
    """``pull_objects`` with at most ``INITIAL_BACKOFF_S`` / ``BACKOFF_CAP_S`` between tries."""
    if getattr(pull_objects, "fedpriv_prompt", False):
        return pull_objects

    @functools.wraps(pull_objects)
    def pull(object_ids, pull_object_fn, **options):
        options["initial_backoff"] = min(options.get("initial_backoff", INITIAL_BACKOFF_S), INITIAL_BACKOFF_S)
        options["backoff_cap"] = min(options.get("backoff_cap", BACKOFF_CAP_S), BACKOFF_CAP_S)
        return pull_objects(object_ids, riding_out_server_errors(pull_object_fn), **options)

    pull.fedpriv_prompt = True
    return pull


def _is_transient(exc: BaseException) -> bool:
    """A 5xx answer (the SuperLink's SQLite ``database is locked`` is a 500) or a dropped connection."""
    import httpx

    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500
    return isinstance(exc, httpx.TransportError)


def riding_out_server_errors(pull_object_fn, tries: int = SERVER_ERROR_TRIES):
    """``pull_object_fn`` that reports a transient server error as "not there yet", ``tries`` times per object.

    Flower 1.41 retries an object only while it is unavailable: any other error drops the whole message.
    Ten nodes pulling at once made the SuperLink's SQLite answer 500 (``database is locked``) to one pull,
    the node dropped its evaluate message and the coordinator waited for its reply until the round timed
    out. Retried, the pull succeeds a moment later; a server that keeps failing still fails the pull.
    """
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    failures: dict[str, int] = {}

    def pull_object(object_id: str):
        try:
            return pull_object_fn(object_id)
        except Exception as exc:
            failures[object_id] = failures.get(object_id, 0) + 1
            if not _is_transient(exc) or failures[object_id] > tries:
                raise
            raise ObjectUnavailableError(object_id) from exc

    return pull_object


def install(module: ModuleType) -> None:
    """Replace ``module.pull_objects`` (Flower's, as that module imported it) by its prompt version."""
    original = getattr(module, "pull_objects", None)
    if not callable(original):
        raise SystemExit(
            f"fedpriv: {module.__name__} has no pull_objects in this Flower release (flwr{FLOWER_RANGE} expected)"
        )
    module.pull_objects = prompt(original)
