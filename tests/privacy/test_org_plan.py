"""An organisation's (epsilon, delta) target and its privacy plan are resolved in one place
(fedpriv/privacy/org_plan.py), whoever asks: the simulated node, the pre-flight check, the server, the audit."""

from __future__ import annotations

import pytest
from flwr.app import Context, RecordDict

from fedpriv.client import node
from fedpriv.kernel import protocol
from fedpriv.kernel.config import load_config
from fedpriv.privacy.org_plan import org_privacy_plan, org_target
from fedpriv.server.run_record import epsilon_targets
from fedpriv.simulations.runner import preflight

OVERRIDES = [
    "model.name=tiny",
    "partitioning.scheme=iid",
    "partitioning.num_orgs=3",
    "data.max_examples=300",
    "training.batch_size=8",
    "privacy.orgs={org-1: {target_epsilon: 3, delta: 1.0e-6}, org-2: {delta: 1.0e-4}}",
]


def test_an_organisations_target_is_its_override_else_the_runs_and_what_its_node_reported_comes_first():
    cfg = load_config(overrides=OVERRIDES)
    assert org_target(cfg, "org-0") == (8.0, 1e-5)
    assert org_target(cfg, "org-1") == (3.0, 1e-6)
    assert org_target(cfg, "org-2") == (8.0, 1e-4)  # an override of delta alone keeps the run's epsilon
    assert org_target(cfg, "org-1", {}) == (3.0, 1e-6)  # a node without DP reports no target
    assert org_target(cfg, "org-1", {"target_epsilon": 5.0, "delta": 1e-7}) == (5.0, 1e-7)  # a deployment node's own


def test_a_plan_is_made_for_the_target_it_is_handed_never_one_it_looks_up():
    cfg = load_config(overrides=OVERRIDES)
    with pytest.raises(TypeError):
        org_privacy_plan(cfg, "org-1", 100)  # no target: no silent fallback to the run config's
    plan = org_privacy_plan(cfg, "org-1", 100, (2.0, 1e-6), calibrate=False)
    assert (plan.target_epsilon, plan.delta) == (2.0, 1e-6)


def test_the_node_the_preflight_check_and_the_server_agree_on_every_organisations_target(monkeypatch):
    monkeypatch.setattr(node, "_NODES", type(node._NODES)())
    cfg = load_config(overrides=OVERRIDES)
    plan = preflight(cfg)
    seen = {}
    for partition_id, org in enumerate(plan.partitions.orgs):
        expected = org_target(cfg, org.name)
        simulated = node.local_node(cfg, _context(partition_id))
        assert simulated.org == org.name and (simulated.target_epsilon, simulated.delta) == expected
        assert (plan.privacy[org.name].target_epsilon, plan.privacy[org.name].delta) == expected
        assert epsilon_targets(cfg, {org.name: {}}) == {org.name: expected[0]}
        seen[org.name] = expected
    assert seen == {"org-0": (8.0, 1e-5), "org-1": (3.0, 1e-6), "org-2": (8.0, 1e-4)}


def _context(partition_id: int) -> Context:
    config = {protocol.NODE_PARTITION_ID: partition_id}
    return Context(run_id=1, node_id=partition_id, node_config=config, state=RecordDict(), run_config={})
