"""SecAgg+ rounds with nodes that fail mid-round: survive down to the threshold, and never report a lost round."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedpriv.kernel.config import load_config
from fedpriv.kernel.errors import ConfigError
from fedpriv.server.secure_rounds import secagg_shares

pytestmark = pytest.mark.integration

# A ClientApp whose chosen nodes crash in their train handler (after SecAgg+ key setup), with the real ServerApp.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    from flwr.clientapp import ClientApp
    from flwr.simulation import run_simulation

    from fedpriv.client.client_app import handle_evaluate, handle_train, secagg_when_requested
    from fedpriv.kernel.config import load_config
    from fedpriv.server.server_app import build_server_app
    from fedpriv.simulations.runner import backend_config

    out, failing = Path(sys.argv[1]), {int(r): set(ps) for r, ps in json.loads(sys.argv[2]).items()}
    cfg = load_config(overrides=[
        "model.name=tiny", "partitioning.num_orgs=4", "partitioning.scheme=iid", "data.max_examples=200",
        "training.batch_size=16", "data.max_length=32", f"training.rounds={max(failing)}", "output.export_model=false",
        "secure_aggregation.enabled=true", "secure_aggregation.max_weight=64", f"run.out_dir={out}",
    ])
    app = ClientApp()

    @app.train(mods=[secagg_when_requested])
    def train(msg, context):
        server_round = int(msg.content.config_records["fitins.config"]["server-round"])
        if int(context.node_config["partition-id"]) in failing.get(server_round, ()):
            raise RuntimeError("simulated dropout")
        return handle_train(cfg, msg, context)

    @app.evaluate()
    def evaluate(msg, context):
        return handle_evaluate(cfg, msg, context)

    out.mkdir(parents=True)
    run_simulation(server_app=build_server_app(cfg, out, 4), client_app=app, num_supernodes=4,
                   backend_config=backend_config(cfg, verbose=False))
    """
)


def _run(tmp_path: Path, failing: dict[int, list[int]]) -> tuple[str, dict]:
    script = tmp_path / "dropouts.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(script), str(out), json.dumps(failing)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads((out / "summary.json").read_text())


def test_default_shares_and_threshold():
    cfg = load_config(overrides=["secure_aggregation.enabled=true"])
    assert secagg_shares(cfg, 4) == (4, 3)
    assert secagg_shares(cfg, 10) == (10, 7)
    cfg = load_config(overrides=["secure_aggregation.num_shares=5", "secure_aggregation.reconstruction_threshold=4"])
    assert secagg_shares(cfg, 8) == (5, 4)
    assert secagg_shares(load_config(), 3) == (3, 2)  # Flower: threshold < num_shares
    with pytest.raises(ConfigError, match="at least 3 organisations"):
        secagg_shares(load_config(), 2)
    with pytest.raises(ConfigError, match="expected < num_shares"):
        load_config(overrides=["secure_aggregation.num_shares=4", "secure_aggregation.reconstruction_threshold=4"])


def test_one_dropout_leaves_the_round_to_the_survivors_and_too_many_halt_the_next(tmp_path):
    stdout, summary = _run(tmp_path, {1: [3], 2: [2, 3]})  # threshold 3 of 4: round 2 keeps only 2
    first, second = summary["rounds"]
    assert first["trained_orgs"] == ["org-0", "org-1", "org-2"]
    assert set(summary["privacy"]) == {"org-0", "org-1", "org-2"}  # org-3 spent nothing it did not report
    assert "secure aggregation halted" in stdout and "NO organisation trained" in stdout
    # why, from each failing node's own error reply (Flower's SecAgg+ workflow drops it without a word)
    assert stdout.count("failed in secagg:collect_masked_vectors: RuntimeError: simulated dropout") == 3
    # named once known: org-2 and org-3 failed in round 2; org-2 had reported its ledger in round 1, org-3 never
    assert "(org-2) failed in secagg:collect_masked_vectors" in stdout and "(org-3)" not in stdout
    assert summary["status"] == "incomplete" and summary["rounds_without_training"] == [2]
    assert second["trained_orgs"] == []


@pytest.mark.parametrize(("name", "cls"), [("fedavg", "FedAvg"), ("fedprox", "FedProx"), ("fedadam", "FedAdam")])
def test_both_paths_pick_the_configured_flower_strategy(name, cls, tmp_path):
    import numpy as np

    from fedpriv.server.budget_gate import BudgetState
    from fedpriv.server.ledger_store import LedgerStore
    from fedpriv.server.round_tracker import RoundTracker
    from fedpriv.server.secure_rounds import _legacy_strategy
    from fedpriv.server.strategy import build_strategy

    cfg = load_config(overrides=[f"strategy.name={name}"])
    tracker = RoundTracker(num_rounds=1, num_labels=2, dp_enabled=True)
    plain = build_strategy(cfg.strategy, tracker, 4)
    budget = BudgetState(LedgerStore(tmp_path))
    legacy = _legacy_strategy(cfg, tracker, [np.zeros(2)], 4, {"base-digest": "x"}, budget)
    assert (type(plain).__name__, type(legacy).__name__) == (cls, cls)
    assert type(plain).__module__.startswith("flwr.serverapp.") and type(legacy).__module__.startswith("flwr.server.")


def test_failure_lines_name_the_org_once_known_and_stop_after_ten_per_round_and_exchange():
    from types import SimpleNamespace

    from fedpriv.server.secure_rounds import MAX_FAILURES_SAID, FailureReports

    lines, server_round = [], [1]
    reports = FailureReports(lines.append, 3, {7: "org-7"}, lambda: server_round[0])

    def failed(node_id):
        error = SimpleNamespace(reason="<class 'RuntimeError'>:<'disk full'>", code=0)
        return SimpleNamespace(metadata=SimpleNamespace(src_node_id=node_id), error=error)

    for node_id in range(7, 7 + MAX_FAILURES_SAID + 5):
        reports("secagg:setup", failed(node_id))
    assert lines[0] == "[round 1/3]  node 7 (org-7) failed in secagg:setup: RuntimeError: disk full"
    assert lines[1].startswith("[round 1/3]  node 8 failed")
    assert (
        len(lines) == MAX_FAILURES_SAID + 1
        and lines[-1] == "[round 1/3]  more nodes failed in secagg:setup: their own logs say why"
    )
    reports("secagg:unmask", failed(30))  # another exchange, and another round, start counting again
    server_round[0] = 2
    reports("secagg:setup", failed(31))
    assert lines[-2:] == [
        "[round 1/3]  node 30 failed in secagg:unmask: RuntimeError: disk full",
        "[round 2/3]  node 31 failed in secagg:setup: RuntimeError: disk full",
    ]
