"""``fedpriv-superlink``: Flower's ``flower-superlink`` where a message is answered when it arrives, not at a poll.

Same command line and behaviour as ``flower-superlink`` (TLS, SuperNode
authentication, state database, every API), with two changes, both long polls
(fedpriv/runtime/wakeups.py):
- a SuperNode's ``PullMessages`` that finds no message for it is held up to
  ``HOLD_S`` and answered as soon as the ServerApp pushes messages, instead of
  coming back empty at once. A SuperNode polled every 0.5 s (fedpriv-supernode)
  or 3 s (flower-supernode), so each of a round's exchanges (five with SecAgg+)
  reached the last node up to one poll after it was sent. ``fedpriv-supernode``
  notices a held pull and asks again at once; Flower's SuperNode still sleeps
  its 3 s after an empty answer, now on top of the hold;
- the ServerApp's ``PullMessages`` (the coordinator asking for its replies)
  that finds none of them is held up to ``REPLY_HOLD_S`` and answered as soon
  as a node pushes a reply. The coordinator's Grid (server/prompt_grid.py)
  then asks again at once instead of every 0.2 s: the last reply of an
  exchange is read when it arrives, and an exchange that waits 90 s for
  training costs a request per reply or per hold, not five a second.

At most ``MAX_HELD`` node pulls (and ``MAX_HELD_REPLY_PULLS`` ServerApp pulls)
wait at once (each holds one of the HTTP server's worker threads, 40 by
default): past that, empty answers leave at once as before, so a federation of
thousands of nodes falls back to plain polling instead of starving the
ServerApp's requests.

Patched into Flower's Fleet and Runtime API handler modules (looked up by name
on every request); fedpriv/runtime/patch_points.py checks them before anything
is patched and refuses, in one line, a Flower release that moved them.
"""

from __future__ import annotations

from fedpriv.runtime import patch_points
from fedpriv.runtime.wakeups import Wakeups, held, noting

HOLD_S = 2.0  # the longest a node's empty PullMessages waits for a message
MAX_HELD = 24  # node pulls held at once (the HTTP server's thread pool has 40 workers)
REPLY_HOLD_S = 2.0  # the longest the ServerApp's empty PullMessages waits for a reply
MAX_HELD_REPLY_PULLS = 4  # ServerApp pulls held at once (one per running ServerApp)

WAKEUPS = Wakeups()  # the ServerApp pushed messages (for the nodes)
REPLIES = Wakeups()  # a node pushed messages (replies, for the ServerApp)


def _empty(response) -> bool:
    return not response.messages_list


def install(fleet_handlers, runtime_handlers, wakeups: Wakeups = WAKEUPS, replies: Wakeups = REPLIES) -> None:
    """Hold empty Fleet pulls until the ServerApp pushes messages (noted in the Runtime API's push handler), and
    the ServerApp's empty pulls until a node pushes a reply (noted in the Fleet API's push handler)."""
    if not getattr(runtime_handlers.push_messages, "fedpriv_noting", False):
        runtime_handlers.push_messages = noting(runtime_handlers.push_messages, wakeups)
    if not getattr(fleet_handlers.pull_messages, "fedpriv_held", False):
        pull = held(fleet_handlers.pull_messages, wakeups, hold_s=HOLD_S, empty=_empty, max_held=MAX_HELD)
        fleet_handlers.pull_messages = _keyword_request(pull)
    if not getattr(fleet_handlers.push_messages, "fedpriv_noting", False):
        fleet_handlers.push_messages = noting(fleet_handlers.push_messages, replies)
    if not getattr(runtime_handlers.pull_messages, "fedpriv_held", False):
        runtime_handlers.pull_messages = held(
            runtime_handlers.pull_messages,
            replies,
            hold_s=REPLY_HOLD_S,
            empty=_empty,
            max_held=MAX_HELD_REPLY_PULLS,
        )


def _keyword_request(pull):
    """Flower's router calls ``pull_messages(request=..., state=..., store=...)``: ``held`` takes the request first."""

    def pull_messages(request, state, store):
        return pull(request, state=state, store=store)

    pull_messages.fedpriv_held = True
    pull_messages.__wrapped__ = pull
    return pull_messages


def main() -> None:
    patch_points.refuse_unless_fits("fedpriv-superlink")  # one line and exit 2 where Flower moved a patch point
    from flwr.superlink.cli.flower_superlink import flower_superlink
    from flwr.superlink.servicer.fleet import fleet_handlers
    from flwr.superlink.servicer.runtime import runtime_handlers

    install(fleet_handlers, runtime_handlers)
    flower_superlink()


if __name__ == "__main__":
    main()
