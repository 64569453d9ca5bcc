"""PromptGrid: the same pushes and pulls as Flower's Grid, a shorter wait between pulls."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fedpriv.server import prompt_grid
from fedpriv.server.prompt_grid import PromptGrid


class SlowRepliesGrid:
    """Replies to message i arrive at pull number ``arrive_at[i]``; records every call."""

    pull_interval = 3.0

    def __init__(self, arrive_at: list[int]) -> None:
        self.arrive_at = arrive_at
        self.pulls = 0
        self.pushed = []

    def push_messages(self, messages):
        self.pushed = list(messages)
        return [f"m{i}" for i in range(len(self.pushed))]

    def pull_messages(self, message_ids):
        self.pulls += 1
        wanted = set(message_ids)
        return [
            SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"m{i}"), has_content=lambda: False)
            for i, at in enumerate(self.arrive_at)
            if at == self.pulls and f"m{i}" in wanted
        ]

    def get_node_ids(self):
        return [1, 2, 3]

    def close(self):
        return "closed"


@pytest.fixture
def sleeps(monkeypatch):
    waited: list[float] = []
    monkeypatch.setattr(prompt_grid.time, "sleep", waited.append)
    return waited


def test_all_replies_are_collected_with_short_waits(sleeps):
    inner = SlowRepliesGrid(arrive_at=[1, 3, 4])
    replies = PromptGrid(inner).send_and_receive(["a", "b", "c"])
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert inner.pushed == ["a", "b", "c"] and inner.pulls == 4
    # a pull that brought a reply is followed by another at once; only the empty pull 2 waits (Flower's HttpGrid
    # would have waited 3 s after each of the first three)
    assert sleeps == [prompt_grid.PULL_INTERVAL_S]


class HeldPullsGrid(SlowRepliesGrid):
    """Behind fedpriv-superlink: an empty pull comes back after the SuperLink held it (``held_s`` of the clock)."""

    def __init__(self, arrive_at: list[int], clock: list[float], held_s: float) -> None:
        super().__init__(arrive_at)
        self.clock, self.held_s = clock, held_s

    def pull_messages(self, message_ids):
        replies = super().pull_messages(message_ids)
        if not replies:
            self.clock[0] += self.held_s
        return replies


def test_a_pull_the_superlink_held_is_followed_by_the_next_at_once(sleeps, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(prompt_grid.time, "monotonic", lambda: clock[0])
    inner = HeldPullsGrid(arrive_at=[3, 5], clock=clock, held_s=2.0)
    replies = PromptGrid(inner).send_and_receive(["a", "b"])
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    assert inner.pulls == 5 and sleeps == []  # the SuperLink did the waiting
    clock[0] = 0.0
    quick = HeldPullsGrid(arrive_at=[3, 5], clock=clock, held_s=0.01)  # empty answers at once: a stock SuperLink
    PromptGrid(quick).send_and_receive(["a", "b"])
    assert sleeps == [prompt_grid.PULL_INTERVAL_S] * 3  # after the empty pulls 1, 2 and 4


def test_the_timeout_still_ends_the_wait(sleeps, monkeypatch):
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr(prompt_grid.time, "time", lambda: next(clock))
    inner = SlowRepliesGrid(arrive_at=[1, 99])
    replies = PromptGrid(inner).send_and_receive(["a", "b"], timeout=25)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]  # the late reply is left out, as in Flower


def test_an_exchange_without_a_timeout_waits_at_most_the_default(sleeps, monkeypatch):
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr(prompt_grid.time, "time", lambda: next(clock))
    inner = SlowRepliesGrid(arrive_at=[1, 99])  # the second node never answers (dead or hung)
    replies = PromptGrid(inner, default_timeout=35).send_and_receive(["a", "b"])  # as default_evaluate_workflow
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert inner.pulls == 3  # deadline 0 + 35: pulls at t = 10, 20, 30; at t = 40 it gives up


def test_a_timeout_given_by_the_caller_wins_over_the_default(sleeps, monkeypatch):
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr(prompt_grid.time, "time", lambda: next(clock))
    inner = SlowRepliesGrid(arrive_at=[1, 99])
    PromptGrid(inner, default_timeout=35).send_and_receive(["a", "b"], timeout=15)
    assert inner.pulls == 1  # deadline 0 + 15: one pull at t = 10, none at t = 20


def test_it_never_polls_slower_than_the_wrapped_grid_and_delegates_the_rest():
    fast = SlowRepliesGrid([1])
    fast.pull_interval = 0.05
    grid = PromptGrid(fast)
    assert grid.pull_interval == 0.05
    assert list(grid.get_node_ids()) == [1, 2, 3]
    assert grid.close() == "closed"


def test_an_http_grid_gets_prompt_pulls_of_reply_arrays(monkeypatch):
    from flwr.superlink.grid import http_grid

    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)
    PromptGrid(object.__new__(http_grid.HttpGrid))
    assert http_grid.pull_objects.fedpriv_prompt


def test_masked_vectors_arrive_widened_and_a_malformed_one_becomes_that_node_s_error(monkeypatch):
    import numpy as np
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.common import bytes_to_ndarray, ndarray_to_bytes
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 7), ("_node_id", SUPERLINK_NODE_ID), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)

    from fedpriv.runtime.masked_vectors import MASKED, SECAGG_CONFIGS

    def reply(vector, node_id):
        content = RecordDict({SECAGG_CONFIGS: ConfigRecord({MASKED: [ndarray_to_bytes(vector)]})})
        msg = Message(content, dst_node_id=node_id, message_type="train")
        msg.metadata.__dict__["_src_node_id"] = node_id  # as a reply pulled from the SuperLink
        return msg

    class Replies(SlowRepliesGrid):
        def pull_messages(self, message_ids):
            return [reply(np.array([7, 2**32 - 1], dtype=np.uint32), 1), reply(np.array([0.5]), 2)]

    good, bad = PromptGrid(Replies([])).pull_messages(["m0", "m1"])
    vector = bytes_to_ndarray(good.content.config_records[SECAGG_CONFIGS][MASKED][0])
    assert vector.dtype == np.int64 and vector.tolist() == [7, 2**32 - 1]
    assert bad.has_error() and not bad.has_content()
    assert "node 2: masked vector refused" in bad.error.reason


def test_exchange_timings_are_written_only_when_asked(tmp_path, monkeypatch):
    import json

    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    content = RecordDict({"secaggplus_configs": ConfigRecord({"stage": "share_keys"})})
    messages = [Message(content, dst_node_id=node, message_type="train", group_id="2") for node in (1, 2, 3)]
    PromptGrid(SlowRepliesGrid(arrive_at=[1, 1, 1])).send_and_receive(messages)  # no file named: nothing written
    path = tmp_path / "exchanges.jsonl"
    monkeypatch.setenv(prompt_grid.EXCHANGE_TIMINGS_ENV, str(path))
    assert not path.exists()
    PromptGrid(SlowRepliesGrid(arrive_at=[1, 2, 2])).send_and_receive(messages)
    (entry,) = (json.loads(line) for line in path.read_text().splitlines())
    assert entry["kind"] == "secagg:share_keys" and entry["round"] == "2" and entry["messages"] == 3
    assert 0 <= entry["pushed_s"] <= entry["done_s"] < 5


def test_error_replies_go_to_the_failure_listener_as_one_line(monkeypatch):
    from flwr.app import ConfigRecord, Error, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    content = RecordDict({"secaggplus_configs": ConfigRecord({"stage": "setup"})})
    messages = [Message(content, dst_node_id=node, message_type="train") for node in (1, 2)]
    # Flower's reply for an exception raised in a ClientApp (flwr/supernode/runtime/run_clientapp.py)
    reason = "<class 'fedpriv.client.node.NodeSetupError'>:<'organisation 'org-0': 16 training examples\nin a.csv'>"
    failed = Message(Error(code=0, reason=reason), reply_to=messages[1])
    failed.metadata.__dict__["_src_node_id"] = 2
    ok = SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id="m0"), has_content=lambda: False,
                         has_error=lambda: False)  # fmt: skip

    class OneFails(SlowRepliesGrid):
        def push_messages(self, messages):
            return ["m0", failed.metadata.reply_to_message_id]

        def pull_messages(self, message_ids):
            return [ok, failed]

    grid = PromptGrid(OneFails([]))
    assert len(grid.send_and_receive(messages)) == 2  # no listener: replies returned, nothing else
    heard = []
    grid.on_failure = lambda kind, reply: heard.append(
        (kind, reply.metadata.src_node_id, prompt_grid.failure_reason(reply))
    )
    grid.send_and_receive(messages)
    assert heard == [("secagg:setup", 2, "NodeSetupError: organisation 'org-0': 16 training examples in a.csv")]
    bare = Message(Error(code=3, reason=""), reply_to=messages[0])
    assert prompt_grid.failure_reason(bare) == "error code 3"
    # in simulation: a Ray traceback wrapping the ClientApp's exception (flwr 1.41, Ray 2.x)
    ray = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m"
        ' (pid=1)\n  File "app.py", line 25, in train\n    raise RuntimeError("simulated dropout")\n'
        "RuntimeError: simulated dropout\n\nException ClientAppException occurred. Message: simulated dropout'>"
    )
    wrapped = Message(Error(code=0, reason=ray), reply_to=messages[0])
    assert prompt_grid.failure_reason(wrapped) == "RuntimeError: simulated dropout"
