"""``fedpriv-superlink``: Flower's ``flower-superlink`` whose nodes learn of a message when it is sent.

Same command line and behaviour as ``flower-superlink`` (TLS, SuperNode
authentication, state database, every API), with one change: a SuperNode's
``PullMessages`` that finds no message for it is held up to ``HOLD_S`` and
answered as soon as the ServerApp pushes messages (a long poll, fedpriv/wakeups.py),
instead of coming back empty at once. A SuperNode polled every 0.5 s
(fedpriv-supernode) or 3 s (flower-supernode), so each of a round's exchanges
(five with SecAgg+) reached the last node up to one poll after it was sent.
``fedpriv-supernode`` notices a held pull and asks again at once; Flower's
SuperNode still sleeps its 3 s after an empty answer, now on top of the hold.

At most ``MAX_HELD`` pulls wait at once (each holds one of the HTTP server's
worker threads, 40 by default): past that, empty answers leave at once as
before, so a federation of thousands of nodes falls back to plain polling
instead of starving the ServerApp's requests.

Patched into Flower's Fleet and Runtime API handler modules (looked up by name
on every request); ``check_patch_points`` fails loudly if a Flower release
moves them (flwr is pinned to 1.41.x).
"""

from __future__ import annotations

import importlib
import inspect

from fedpriv.wakeups import Wakeups, held, noting

HOLD_S = 2.0  # the longest an empty PullMessages waits for a message
MAX_HELD = 24  # pulls held at once (the HTTP server's thread pool has 40 workers)
FLEET_ROUTER = "flwr.superlink.routers.fleet.router"
RUNTIME_ROUTER = "flwr.supercore.routers.runtime.router"

WAKEUPS = Wakeups()


def check_patch_points(fleet_handlers, runtime_handlers) -> None:
    """Fail loudly when the Flower release no longer calls what the patches wrap."""
    for module, name, router in (
        (fleet_handlers, "pull_messages", FLEET_ROUTER),
        (runtime_handlers, "push_messages", RUNTIME_ROUTER),
    ):
        caller = f"{'fleet_handlers' if module is fleet_handlers else 'handlers'}.{name}("
        if not callable(getattr(module, name, None)) or caller not in inspect.getsource(
            importlib.import_module(router)
        ):
            raise SystemExit(
                f"fedpriv-superlink: {module.__name__}.{name} is not called as `{caller}` in this Flower release;"
                " run flower-superlink instead"
            )


def install(fleet_handlers, runtime_handlers, wakeups: Wakeups = WAKEUPS) -> None:
    """Hold empty Fleet pulls until the ServerApp pushes messages (noted in the Runtime API's push handler)."""
    if not getattr(runtime_handlers.push_messages, "fedpriv_noting", False):
        runtime_handlers.push_messages = noting(runtime_handlers.push_messages, wakeups)
    if not getattr(fleet_handlers.pull_messages, "fedpriv_held", False):
        pull = held(
            fleet_handlers.pull_messages,
            wakeups,
            hold_s=HOLD_S,
            empty=lambda response: not response.messages_list,
            max_held=MAX_HELD,
        )
        fleet_handlers.pull_messages = _keyword_request(pull)


def _keyword_request(pull):
    """Flower's router calls ``pull_messages(request=..., state=..., store=...)``: ``held`` takes the request first."""

    def pull_messages(request, state, store):
        return pull(request, state=state, store=store)

    pull_messages.fedpriv_held = True
    pull_messages.__wrapped__ = pull
    return pull_messages


def main() -> None:
    from flwr.superlink.cli.flower_superlink import flower_superlink
    from flwr.superlink.servicer.fleet import fleet_handlers
    from flwr.superlink.servicer.runtime import runtime_handlers

    check_patch_points(fleet_handlers, runtime_handlers)
    install(fleet_handlers, runtime_handlers)
    flower_superlink()


if __name__ == "__main__":
    main()
