"""The coordinator's Grid: prompt replies, a deadline on every exchange, SecAgg+ vectors widened on arrival.

Flower 1.41's deployment Grid (``HttpGrid``) checks the SuperLink for replies
every 3 seconds; every exchange of a round (two for FedAvg, five with SecAgg+)
then waits on average 1.5 s after its last reply arrived. ``PromptGrid`` wraps any
Grid, delegates everything to it, and only replaces ``send_and_receive``'s wait
between pulls (the same push, the same pulls, the same timeout semantics): 0.2 s
after an empty answer, none after a pull that brought replies or that the
SuperLink held until one arrived (fedpriv-superlink, fedpriv/runtime/superlink.py). A
reply's arrays that are not on the SuperLink yet are asked for again within
0.5 s, not after Flower's 1, 2, 4, 8 s back-off (fedpriv/runtime/object_pulls.py).

It also gives every exchange a deadline: Flower's ``default_evaluate_workflow``
calls ``send_and_receive`` without a timeout, so a node that died mid-round held
the evaluation until the SuperLink noticed its missing heartbeats (about 30 s),
and a node that hangs would hold it for ever. ``default_timeout`` (the run's
``strategy.round_timeout``) applies wherever the caller gives none.

Replies pulled through it have their SecAgg+ masked vectors widened from the
32-bit words the nodes send back to Flower's int64 (fedpriv/runtime/masked_vectors.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedpriv.kernel.protocol import message_round, message_stage
from fedpriv.runtime import masked_vectors, object_pulls

PULL_INTERVAL_S = 0.2


class PromptGrid(Grid):
    def __init__(
        self, grid: Grid, pull_interval: float = PULL_INTERVAL_S, default_timeout: float | None = None
    ) -> None:
        self.grid = grid
        self.default_timeout = default_timeout
        # called with (exchange kind, error reply) for every node that answered with an error (the SecAgg+ path
        # sets it: Flower's SecAgg+ and legacy evaluate workflows drop such replies without saying why)
        self.on_failure: Callable[[str, Message], None] | None = None
        self.pull_interval = min(pull_interval, getattr(grid, "pull_interval", pull_interval))  # never slower
        grid_module = sys.modules.get(type(grid).__module__)
        if callable(getattr(grid_module, "pull_objects", None)):  # HttpGrid pulls reply arrays with back-off
            object_pulls.install(grid_module)

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        for reply in replies:
            if reply.has_content():
                _widen_masked_vectors(reply)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        if timeout is None:
            timeout = self.default_timeout
        started = time.time()
        messages = list(messages)
        pending = set(self.push_messages(messages))
        pushed = time.time()
        end = time.time() + (timeout or 0.0)
        replies: list[Message] = []
        while timeout is None or time.time() < end:
            asked = time.monotonic()
            arrived = list(self.pull_messages(pending))
            replies.extend(arrived)
            pending.difference_update(msg.metadata.reply_to_message_id for msg in arrived)
            if not pending:
                break
            if not arrived and time.monotonic() - asked < self.pull_interval:
                # answered empty at once: a SuperLink that does not hold the pull until a reply arrives
                # (fedpriv-superlink does: then, and after replies arrived, ask again at once)
                time.sleep(self.pull_interval)
        _note_exchange(messages, started, pushed, time.time())
        if self.on_failure is not None and messages:
            for reply in replies:
                if reply.has_error():
                    self.on_failure(message_stage(messages[0]), reply)
        return replies

    def __getattr__(self, name: str):  # anything else the wrapped Grid offers (close, ...)
        return getattr(self.grid, name)


EXCHANGE_TIMINGS_ENV = "FEDPRIV_EXCHANGE_TIMINGS"  # benchmarks only: one JSON line per exchange into this file


_FLOWER_REASON = re.compile(r"<class '(?:[\w.]*\.)?(\w+)'>:<'(.*)'>", re.DOTALL)
_RAISED = re.compile(r"^\s*(?:[\w.]*\.)?(\w*(?:Error|Exception|Exit|Interrupt)): (.+)$", re.MULTILINE)
_WRAPPERS = {"ClientAppException", "RayTaskError"}  # simulation wraps the ClientApp's exception in these
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def failure_reason(reply: Message) -> str:
    """A node's error reply as one line, ``Error: text``.

    Flower's ClientApp process sends ``<class 'pkg.Error'>:<'text'>``; in simulation the text is a Ray traceback,
    whose last ``SomeError: text`` line is the ClientApp's own exception.
    """
    reason = _ANSI.sub("", str(reply.error.reason or "")).strip()
    raised = [m for m in _RAISED.finditer(reason) if m.group(1) not in _WRAPPERS]
    match = _FLOWER_REASON.fullmatch(reason)
    if raised:
        reason = f"{raised[-1].group(1)}: {raised[-1].group(2)}"
    elif match:
        reason = f"{match.group(1)}: {match.group(2)}"
    reason = " ".join(reason.split()) or f"error code {reply.error.code}"
    return reason if len(reason) <= 500 else reason[:497] + "..."


def _note_exchange(messages: list[Message], started: float, pushed: float, done: float) -> None:
    """With ``FEDPRIV_EXCHANGE_TIMINGS`` set: when an exchange started, when its messages (and their objects) were
    on the SuperLink, and when the last reply was in (wall clock); lines up with the nodes' stage timings."""
    path = os.environ.get(EXCHANGE_TIMINGS_ENV)
    if not path or not messages:
        return
    first = messages[0]
    entry = {
        "kind": message_stage(first),
        "round": message_round(first),
        "messages": len(messages),
        "started_at": round(started, 3),
    }
    entry.update(pushed_s=round(pushed - started, 3), done_s=round(done - started, 3))
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")


def _widen_masked_vectors(reply: Message) -> None:
    """SecAgg+ masked vectors back to Flower's int64 (fedpriv/runtime/masked_vectors.py); a malformed one turns the
    reply into an error reply, so the workflow counts that node as dropped instead of summing garbage."""
    try:
        masked_vectors.widen(reply.content)
    except masked_vectors.MaskedVectorError as err:
        reason = f"node {reply.metadata.src_node_id}: masked vector refused: {err}"
        log(logging.WARNING, reason)
        reply.__dict__["_content"] = None  # flwr Message: content and error are exclusive
        reply.error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
