"""fedpriv-superlink: a node's empty pull waits for the ServerApp's next push instead of coming back empty."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from flwr.superlink.servicer.fleet import fleet_handlers

from fedpriv.runtime import patch_points, superlink
from fedpriv.runtime.wakeups import Wakeups


def test_the_patch_points_exist_in_this_flower_release():
    assert patch_points.refusal("fedpriv-superlink") is None  # fails loudly when a Flower upgrade moves them


def test_patch_points_that_moved_are_refused(monkeypatch):
    monkeypatch.setattr(fleet_handlers, "pull_messages", None)
    line = patch_points.refusal("fedpriv-superlink")
    assert "fleet_handlers.pull_messages is not a function" in line and line.endswith("run flower-superlink instead")


def fake_link(pull_messages=None, push_ins=None, pull_replies=None, push_replies=None):
    """Flower's four handlers that the patches wrap: the Fleet API (nodes) and the Runtime API (the ServerApp)."""

    def unused(*args, **kwargs):
        raise AssertionError("not part of this test")

    fleet = SimpleNamespace(
        __name__="fleet", pull_messages=pull_messages or unused, push_messages=push_replies or unused
    )
    runtime = SimpleNamespace(
        __name__="runtime", push_messages=push_ins or unused, pull_messages=pull_replies or unused
    )
    return fleet, runtime


def test_the_serverapps_pull_with_no_reply_is_answered_when_a_node_pushes_one():
    stored: dict[str, str] = {}  # instruction message id -> its reply
    looks = []

    def pull_replies(request, state, task):  # Flower's Runtime API pull: the replies to these messages, or none
        looks.append(sorted(request.message_ids))
        return SimpleNamespace(messages_list=[stored.pop(i) for i in sorted(request.message_ids) if i in stored])

    def push_replies(request, state):  # Flower's Fleet API push: a node's replies
        stored.update(request)

    fleet, runtime = fake_link(pull_replies=pull_replies, push_replies=push_replies)
    superlink.install(fleet, runtime, Wakeups(), Wakeups())
    asking = SimpleNamespace(message_ids=["m1", "m2"])
    threading.Timer(0.3, lambda: fleet.push_messages(request={"m2": "reply-2"}, state=None)).start()
    started = time.monotonic()
    response = runtime.pull_messages(asking, None, None)  # as Flower's router calls it
    assert response.messages_list == ["reply-2"]
    assert 0.25 < time.monotonic() - started < 1.5  # when the reply came, not at the coordinator's next poll
    assert looks == [["m1", "m2"], ["m1", "m2"]]
    fleet.push_messages(request={"m1": "reply-1"}, state=None)  # already there: answered at once
    started = time.monotonic()
    assert runtime.pull_messages(asking, None, None).messages_list == ["reply-1"]
    assert time.monotonic() - started < 0.1
    started = time.monotonic()  # nothing comes: empty after the hold
    assert runtime.pull_messages(SimpleNamespace(message_ids=["m3"]), None, None).messages_list == []
    assert superlink.REPLY_HOLD_S - 0.1 < time.monotonic() - started < superlink.REPLY_HOLD_S + 1.0


def test_a_pull_with_no_message_is_answered_when_the_serverapp_pushes():
    queued: dict[int, list[str]] = {}
    looks = []

    def pull_messages(request, state, store):  # Flower's: the node's queued messages, or none
        looks.append(request.node.node_id)
        return SimpleNamespace(messages_list=queued.pop(request.node.node_id, []))

    def push_messages(request, state, task):  # the ServerApp's Runtime API push
        for node_id, message in request:
            queued.setdefault(node_id, []).append(message)

    fleet, runtime = fake_link(pull_messages=pull_messages, push_ins=push_messages)
    wakeups = Wakeups()
    superlink.install(fleet, runtime, wakeups, Wakeups())
    superlink.install(fleet, runtime, wakeups, Wakeups())  # wraps nothing twice

    def request(node_id):
        return SimpleNamespace(node=SimpleNamespace(node_id=node_id))

    threading.Timer(0.3, runtime.push_messages, args=[[(7, "train")], None, None]).start()
    started = time.monotonic()
    response = fleet.pull_messages(request=request(7), state=None, store=None)  # as Flower's router calls it
    assert response.messages_list == ["train"]
    assert 0.25 < time.monotonic() - started < 1.5  # at the push, not at a later poll
    assert looks == [7, 7]
    runtime.push_messages([(8, "evaluate")], None, None)  # already there: answered at once
    started = time.monotonic()
    assert fleet.pull_messages(request=request(8), state=None, store=None).messages_list == ["evaluate"]
    assert time.monotonic() - started < 0.1
    # another node's push wakes a held pull, which looks again and keeps waiting for its own
    threading.Timer(0.2, runtime.push_messages, args=[[(9, "x")], None, None]).start()
    threading.Timer(0.5, runtime.push_messages, args=[[(10, "mine")], None, None]).start()
    started = time.monotonic()
    assert fleet.pull_messages(request=request(10), state=None, store=None).messages_list == ["mine"]
    assert 0.45 < time.monotonic() - started < 1.5
