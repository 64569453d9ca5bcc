"""The coordinator's pre-flight: every node's real query handler answers, failures are named, budgets known early."""

from __future__ import annotations

import json

import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict

from fedpriv.client.client_app import handle_query, handle_train
from fedpriv.data.partitioning import plan_partitions
from fedpriv.kernel import protocol
from fedpriv.kernel.config import load_config
from fedpriv.server import preflight
from fedpriv.server.budget_gate import BudgetState
from fedpriv.server.ledger_store import LedgerStore
from fedpriv.server.preflight import preflight_wanted, run_preflight
from fedpriv.server.prompt_grid import PromptGrid
from tests.handler_messages import HANDLER_RUN, node_message, partition_context

pytestmark = pytest.mark.usefixtures("flower_task_identity")


class NodesGrid:
    """Nodes 11 and 12 are organisations 0 and 1 (the real ClientApp handler answers); 13 fails, 14 never answers,
    15 answers with a ready record that lacks its sizes."""

    def __init__(self, cfg, connected=(11, 12, 13, 14, 15)):
        self.cfg, self.connected, self.sent = cfg, list(connected), []

    def get_node_ids(self):
        return self.connected

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            self.sent.append(message)
            node_id = message.metadata.dst_node_id
            if node_id in (11, 12):
                content = handle_query(self.cfg, message, partition_context(node_id - 11)).content
                replies.append(Message(content, reply_to=message))
            elif node_id == 13:
                error = Error(code=0, reason="<class 'fedpriv.client.node.NodeSetupError'>:<'data.path: no such file'>")
                replies.append(Message(error, reply_to=message))
            elif node_id == 15:
                content = RecordDict({protocol.READY: ConfigRecord({protocol.READY_ORG: "org-x"})})
                replies.append(Message(content, reply_to=message))
        return replies


def _run(cfg, grid, run_dir, said):
    budget = BudgetState(LedgerStore(run_dir, warn=said.append), say=said.append)
    block = run_preflight(
        grid,
        cfg,
        node_config={protocol.RUN_DIR: str(run_dir)},
        num_nodes=5,
        budget=budget,
        say=said.append,
        elapsed=lambda: 12.5,
    )
    return block, budget


def test_every_node_gets_ready_and_the_coordinator_learns_its_plan_and_budget_before_round_1(tmp_path):
    cfg = load_config(overrides=HANDLER_RUN)
    for server_round in (1, 2):  # org-1 already spent its planned rounds in an earlier run on the same state
        handle_train(cfg, node_message(cfg, tmp_path, server_round), partition_context(1))
    said: list[str] = []
    grid = NodesGrid(cfg)
    block, budget = _run(cfg, grid, tmp_path, said)
    assert [m.metadata.message_type for m in grid.sent] == ["query"] * 5
    assert all(protocol.ARRAYS not in m.content for m in grid.sent)  # no weights: nothing to train on
    assert block["nodes_asked"] == 5 and block["elapsed_s"] == 12.5 and block["wall_s"] >= 0
    rows = {row["org"]: row for row in block["ready"]}
    assert sorted(rows) == ["org-0", "org-1"] and rows["org-0"]["node_id"] == 11
    plan = json.loads((tmp_path / "nodes" / "org-0" / "privacy_plan.json").read_text())  # stored by the pre-flight
    assert rows["org-0"]["noise_multiplier"] == plan["noise_multiplier"] and rows["org-0"]["planned_steps"] > 0
    assert rows["org-0"]["train_examples"] == len(plan_partitions(cfg).org(0).train)
    assert rows["org-0"]["epsilon"] == 0.0 and 7 < rows["org-1"]["epsilon"] <= rows["org-1"]["max_epsilon"] == 8
    # the budget gate learns which node is which organisation (failure lines name it), not their outlook: a
    # node decides in each round whether it trains (a resumed round it already paid for is answered again)
    assert budget.org_of == {11: "org-0", 12: "org-1"} and budget.select([11, 12], 1) == {11, 12}
    assert budget.heads() == "{}" and budget.outlook == {}  # no ledger entry travelled
    assert block["failed"] == [
        {"node_id": 13, "reason": "NodeSetupError: data.path: no such file"},
        {"node_id": 15, "reason": "malformed ready record (KeyError: 'train-examples')"},
        {"node_id": 14, "reason": "no reply in time"},
    ]
    assert said[0].startswith("pre-flight: 2 of 5 connected node(s) ready in ")
    assert "data loaded, noise calibrated" in said[0]
    assert said[1].startswith("  org-0  train ") and "sigma " in said[1] and said[1].endswith("spent 0.000 of max 8")
    assert f"spent {rows['org-1']['epsilon']:.3f} of max 8" in said[2]
    assert "pre-flight: node 13 is not ready: NodeSetupError: data.path: no such file" in said
    assert "pre-flight: node 14 is not ready: no reply in time" in said


def test_the_preflight_waits_for_the_nodes_the_run_waits_for(tmp_path, monkeypatch):
    cfg = load_config(overrides=[*HANDLER_RUN, "privacy.enabled=false", "strategy.round_timeout=5"])
    grid = NodesGrid(cfg, connected=[])
    joins = iter([[11], [11, 12], [11, 12, 13, 14, 15]])
    monkeypatch.setattr(preflight.time, "sleep", lambda s: setattr(grid, "connected", next(joins)))
    block, _ = _run(cfg, grid, tmp_path, said := [])
    assert block["nodes_asked"] == 5 and [row["org"] for row in block["ready"]] == ["org-0", "org-1"]
    assert "rate" not in json.dumps(block["ready"])  # no privacy plan without DP
    assert said[0].endswith("data loaded") and said[1].startswith("  org-0  train ")
    assert "sigma" not in said[1] and "spent" not in said[1]


def test_auto_runs_it_in_deployment_only():
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    simulation = PromptGrid(object.__new__(InMemoryGrid))
    deployment = PromptGrid(NodesGrid(None))
    auto, always, never = (load_config(overrides=[f"strategy.preflight={v}"]) for v in ("auto", "always", "never"))
    assert not preflight_wanted(auto, simulation) and preflight_wanted(auto, deployment)
    assert preflight_wanted(always, simulation) and not preflight_wanted(never, deployment)


def test_each_node_says_the_length_it_cuts_texts_to_and_the_export_records_the_largest(tmp_path):
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    from fedpriv.server.server_app import _trained_max_length

    cfg = load_config(overrides=[*HANDLER_RUN, "privacy.enabled=false", "data.max_length=48"])
    block, _ = _run(cfg, NodesGrid(cfg), tmp_path, [])
    assert [row["max_length"] for row in block["ready"]] == [48, 48]
    deployment, simulation = object(), InMemoryGrid.__new__(InMemoryGrid)
    assert _trained_max_length(cfg, deployment, {"preflight": block}) == 48
    block["ready"][1]["max_length"] = 96  # each node.yaml sets its own: the export records the largest
    assert _trained_max_length(cfg, deployment, {"preflight": block}) == 96
    assert _trained_max_length(cfg, deployment, {}) is None  # nodes that said nothing: unknown, never a guess
    assert _trained_max_length(cfg, simulation, {}) == 48  # a simulation's nodes cut at the run config's
