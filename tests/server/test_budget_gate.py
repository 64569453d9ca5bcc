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

# `fedpriv simulate` never reuses a run folder (a node's privacy state is never shared by two runs), so each
# second run is started the way the command does it, on a folder whose nodes/ already hold a finished run's state.
# Both second runs (FedAvg, SecAgg+) go through one process, one after the other: imports and the ServerApp's first
# model build are paid once.
SCRIPT = textwrap.dedent(
    """
    import json, shutil, sys
    from pathlib import Path

    from flwr.simulation import run_simulation

    from fedpriv.client.client_app import build_client_app
    from fedpriv.kernel.config import load_config
    from fedpriv.server.server_app import build_server_app
    from fedpriv.simulations.runner import backend_config

    spent, runs = Path(sys.argv[1]), json.loads(sys.argv[2])
    for name, out, overrides in runs:
        out = Path(out)
        print(f"{MARK}{name}", flush=True)
        cfg = load_config(overrides=[*overrides, f"run.out_dir={out}"])
        shutil.copytree(spent, out / "nodes")
        run_simulation(server_app=build_server_app(cfg, out, 3), client_app=build_client_app(cfg), num_supernodes=3,
                       backend_config=backend_config(cfg, verbose=False))
    """
)
MARK = "=== second run: "
VARIANTS = {"fedavg": False, "secagg": True}  # secure_aggregation.enabled


@pytest.fixture(scope="module")
def spent_nodes(tiny_dp_run):
    """Three organisations that trained both planned rounds (the session's shared tiny run): budgets spent."""
    return tiny_dp_run[1] / "nodes"


@pytest.fixture(scope="module")
def second_runs(spent_nodes, tmp_path_factory):
    """{variant: (its stdout, its run folder, the spent ledgers before it)}: a second run on the spent nodes."""
    root = tmp_path_factory.mktemp("second-runs")
    before = {org.name: (org / "ledger.jsonl").read_text() for org in spent_nodes.iterdir()}
    runs = [
        (name, str(root / name), [*TINY, f"secure_aggregation.enabled={str(secure).lower()}"])
        for name, secure in VARIANTS.items()
    ]
    script = root / "second_runs.py"
    script.write_text(SCRIPT.replace("{MARK}", MARK))
    proc = subprocess.run(
        [sys.executable, str(script), str(spent_nodes), json.dumps(runs)],
        capture_output=True, text=True, timeout=900, cwd=root,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    outputs = dict(part.split("\n", 1) for part in proc.stdout.split(MARK)[1:])
    assert sorted(outputs) == sorted(VARIANTS), proc.stdout[-3000:]
    return {name: (outputs[name], root / name, before) for name in VARIANTS}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_nodes_that_already_spent_their_budget_refuse_and_the_run_ends(second_runs, variant):
    stdout, out, before = second_runs[variant]
    secure = VARIANTS[variant]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "budget_exhausted"
    assert "no organisation can train another round within its budget" in summary["budget"]["stopped_reason"]
    assert "run ended after round 1 of 2" in stdout
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
