"""The coordinator's budget gate with the real ServerApp and ClientApp: spent nodes refuse, the run ends."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.shared_runs import TINY_DP_RUN

pytestmark = pytest.mark.integration

TINY = [*TINY_DP_RUN, "output.export_model=false"]  # the shared run's plan: the nodes' stored plans must fit

# `fedpriv simulate` never reuses a run folder (a node's privacy state is never shared by two runs), so the
# second run is started the way the command does it, on a folder whose nodes/ already hold a finished run's state.
SCRIPT = textwrap.dedent(
    """
    import json, shutil, sys
    from pathlib import Path

    from flwr.simulation import run_simulation

    from client.client_app import build_client_app
    from fedpriv.config import load_config
    from server.server_app import build_server_app
    from simulations.runner import backend_config

    out, spent, overrides = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    cfg = load_config(overrides=[*overrides, f"run.out_dir={out}"])
    shutil.copytree(spent, out / "nodes")
    run_simulation(server_app=build_server_app(cfg, out, 3), client_app=build_client_app(cfg), num_supernodes=3,
                   backend_config=backend_config(cfg, verbose=False))
    """
)


@pytest.fixture(scope="module")
def spent_nodes(tiny_dp_run):
    """Three organisations that trained both planned rounds (the session's shared tiny run): budgets spent."""
    return tiny_dp_run[1] / "nodes"


@pytest.mark.parametrize("secure", [False, True], ids=["fedavg", "secagg"])
def test_nodes_that_already_spent_their_budget_refuse_and_the_run_ends(spent_nodes, tmp_path, secure):
    out = tmp_path / "second"
    before = {org.name: (org / "ledger.jsonl").read_text() for org in spent_nodes.iterdir()}
    overrides = [*TINY, f"secure_aggregation.enabled={str(secure).lower()}"]
    script = tmp_path / "second_run.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(out), str(spent_nodes), json.dumps(overrides)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "budget_exhausted"
    assert "no organisation can train another round within its budget" in summary["budget"]["stopped_reason"]
    assert "run ended after round 1 of 2" in proc.stdout
    assert [r["trained_orgs"] for r in summary["rounds"]] == [[]]  # round 1: nobody trained, model unchanged
    if not secure:  # the typed refusal reaches the coordinator as such
        assert sorted(r["org"] for r in summary["budget"]["refusals"]) == ["org-0", "org-1", "org-2"]
    for org, text in before.items():
        ledger = (out / "nodes" / org / "ledger.jsonl").read_text()
        entries = [json.loads(line) for line in ledger.splitlines()]
        assert ledger.startswith(text)
        assert [e["kind"] for e in entries] == ["dp_round", "dp_round", "refusal"]  # nothing spent, refusal kept
        coordinator = [json.loads(line) for line in (out / "ledgers" / f"{org}.jsonl").read_text().splitlines()]
        assert coordinator == entries  # delivered in the refusal (or, under SecAgg+, the evaluate) reply
