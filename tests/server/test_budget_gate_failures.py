"""A round in which every node failed says why, one line per node (Flower's strategy, which logs failures, is
not called then)."""

from __future__ import annotations

import pytest
from flwr.app import Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp.strategy import FedAvg

from fedpriv.server.budget_gate import BudgetGatedStrategy, BudgetState
from fedpriv.server.ledger_store import LedgerStore

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def _error_reply(node_id: int, reason: str) -> Message:
    sent = Message(content=RecordDict(), dst_node_id=node_id, message_type="train")
    reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=sent)
    return reply


def test_a_round_every_node_failed_names_each_node_and_its_one_line_reason(tmp_path):
    said: list[str] = []
    state = BudgetState(LedgerStore(tmp_path), say=said.append)
    state.org_of[7] = "org-1"
    gate = BudgetGatedStrategy(FedAvg(), state)
    full = "DiskError: cannot write /r/nodes/org-1/train-reply.safetensors: [Errno 28] No space left on device"
    assert gate.aggregate_train(2, [_error_reply(7, full), _error_reply(9, "DiskError: cannot write /x")]) == (
        None,
        None,
    )
    assert said == [
        f"[round 2]  org-1 did not train: {full}",
        "[round 2]  node 9 did not train: DiskError: cannot write /x",
    ]
