"""A round the coordinator lost is answered again with the stored reply, never trained (and paid for) twice."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedpriv.client import replay
from fedpriv.client.client_app import handle_train
from fedpriv.client.node import NodeSetupError
from fedpriv.kernel import protocol
from fedpriv.kernel.config import load_config
from tests.handler_messages import HANDLER_RUN, node_message, partition_context

pytestmark = pytest.mark.usefixtures("flower_task_identity")
CFG = load_config(overrides=HANDLER_RUN)


def _ledger(run_dir, org="org-0") -> list[dict]:
    path = run_dir / "nodes" / org / "ledger.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _arrays(reply) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in reply.content[protocol.ARRAYS].items()}


def _shifted(message):
    """The same round's message carrying another global model."""
    arrays = message.content[protocol.ARRAYS]
    first = next(iter(arrays))
    changed = {name: Array(a.numpy() + (0.01 if name == first else 0.0)) for name, a in arrays.items()}
    message.content[protocol.ARRAYS] = ArrayRecord(array_dict=changed)
    return message


def test_the_same_round_and_global_model_get_the_stored_reply_and_spend_nothing(tmp_path):
    first = handle_train(CFG, node_message(CFG, tmp_path, 1), partition_context())
    entries = _ledger(tmp_path)
    again = handle_train(CFG, node_message(CFG, tmp_path, 1), partition_context())
    assert _ledger(tmp_path) == entries and [e["round"] for e in entries] == [1]  # no new step, no new entry
    assert all(np.array_equal(a, _arrays(again)[name]) for name, a in _arrays(first).items())
    assert dict(again.content[protocol.METRICS]) == dict(first.content[protocol.METRICS])
    assert again.content[protocol.PRIVACY]["epsilon"] == first.content[protocol.PRIVACY]["epsilon"]
    assert again.content[protocol.PRIVACY]["steps"] == first.content[protocol.PRIVACY]["steps"]
    # the next round is trained as usual
    handle_train(CFG, node_message(CFG, tmp_path, 2), partition_context())
    assert [e["round"] for e in _ledger(tmp_path)] == [1, 2]


def test_a_trained_round_on_another_global_model_is_refused_not_trained_again(tmp_path):
    handle_train(CFG, node_message(CFG, tmp_path, 1), partition_context())
    with pytest.raises(NodeSetupError, match="already trained round 1 of this run.*spend privacy twice"):
        handle_train(CFG, _shifted(node_message(CFG, tmp_path, 1)), partition_context())
    handle_train(CFG, node_message(CFG, tmp_path, 2), partition_context())
    with pytest.raises(NodeSetupError, match="already trained round 2"):  # a coordinator that went back a round
        handle_train(CFG, node_message(CFG, tmp_path, 1), partition_context())
    assert [e["round"] for e in _ledger(tmp_path)] == [1, 2]


def test_a_round_recorded_but_not_stored_sits_out_and_one_never_recorded_is_trained(tmp_path):
    handle_train(CFG, node_message(CFG, tmp_path, 1), partition_context())
    folder = tmp_path / "nodes" / "org-0"
    meta = json.loads((folder / replay.META_FILE).read_text())
    # the node stopped after its ledger entry, before the reply was stored: the round is paid for, not replayable
    (folder / replay.META_FILE).write_text(json.dumps({**meta, "status": "training"}))
    (folder / replay.ARRAYS_FILE).unlink()
    with pytest.raises(NodeSetupError, match="round 1 was trained and recorded.*sits this round out"):
        handle_train(CFG, node_message(CFG, tmp_path, 1), partition_context())
    # the node stopped before its first DP step (the ledger is as long as when it began): nothing spent, train
    (folder / replay.META_FILE).write_text(json.dumps({**meta, "status": "training", "ledger_length": 1}))
    handle_train(CFG, node_message(CFG, tmp_path, 1), partition_context())
    assert [e["round"] for e in _ledger(tmp_path)] == [1, 1]


def test_a_reply_stored_before_its_ledger_entry_is_sent_only_once_the_entry_exists(tmp_path):
    """The update is stored before the ledger entry: a stop in between leaves a reply that was never released."""
    first = handle_train(CFG, node_message(CFG, tmp_path, 1), partition_context())
    folder = tmp_path / "nodes" / "org-0"
    meta = json.loads((folder / replay.META_FILE).read_text())
    # stopped after its ledger entry, before marking the reply done: the reply is the round's release, sent again
    (folder / replay.META_FILE).write_text(json.dumps({**meta, "status": "stored"}))
    again = handle_train(CFG, node_message(CFG, tmp_path, 1), partition_context())
    assert all(np.array_equal(a, _arrays(again)[name]) for name, a in _arrays(first).items())
    assert json.loads((folder / replay.META_FILE).read_text())["status"] == "done"
    assert [e["round"] for e in _ledger(tmp_path)] == [1]
    # stopped before its ledger entry (the ledger is as long as when it began): never sent, trained afresh
    (folder / replay.META_FILE).write_text(json.dumps({**meta, "status": "stored", "ledger_length": 1}))
    handle_train(CFG, node_message(CFG, tmp_path, 1), partition_context())
    assert [e["round"] for e in _ledger(tmp_path)] == [1, 1]


def test_another_run_in_the_same_state_folder_trains_its_own_round_one(tmp_path):
    """Deployment nodes keep one state folder across runs: the stored reply belongs to one run only."""
    handle_train(CFG, node_message(CFG, tmp_path, 1), partition_context())
    folder = tmp_path / "nodes" / "org-0"
    meta = json.loads((folder / replay.META_FILE).read_text())
    (folder / replay.META_FILE).write_text(json.dumps({**meta, "run": "/elsewhere/an-earlier-run"}))
    handle_train(CFG, node_message(CFG, tmp_path, 1), partition_context())
    assert [e["round"] for e in _ledger(tmp_path)] == [1, 1]
