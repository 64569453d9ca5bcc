"""Whole simulations through the ``fedpriv`` command: Flower's simulation engine, real Opacus accounting."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedpriv.kernel import protocol
from fedpriv.privacy.calibration import compute_epsilon
from tests.shared_runs import TINY_DP_RUN, simulate_in_sequence

SUMMARY_ROUND_FIELDS = {"round", "accuracy", "macro_f1", "loss", "epsilon"}
SUMMARY_PRIVACY_FIELDS = {"epsilon", "delta", "target_epsilon", "noise_multiplier", "sample_rate", "steps"}

pytestmark = pytest.mark.integration

# Two organisations, tiny model, a few seconds of training per round.
TINY_PAIR = [
    "model.name=tiny",
    "partitioning.num_orgs=2",
    "partitioning.scheme=iid",  # the Dirichlet path has its own tests (tests/fedpriv/data/test_partitioning.py)
    "data.max_examples=120",
    "training.batch_size=16",
    "data.max_length=32",
    "output.export_model=false",
]


# DP off, 3 IID organisations, one round: reproducible local rounds, for the SecAgg+ aggregate test
SECAGG_COMMON = [*TINY_PAIR, "partitioning.num_orgs=3", "training.rounds=1", "privacy.enabled=false"]
# Three whole runs that no other test reads, made in one process (tests.shared_runs.simulate_in_sequence): the
# imports and the ServerApp's first model build are paid once. Each is read by one test below.
RUNS = {
    # organisation-level DP (around FedProx) with a budget that fits 2 of 3 rounds: the run stops with exit code 1
    "client_dp": [
        *TINY_PAIR,
        "training.rounds=3",
        "client_dp.enabled=true",
        "strategy.name=fedprox",
        "client_dp.noise_multiplier=0.8",
        "client_dp.max_epsilon=10",
    ],
    "news": [
        "partitioning.num_orgs=2",
        "data.max_examples=560",
        "data.max_length=32",  # headline and lead: half the default 64 tokens
        "training.rounds=2",
        "output.export_model=false",
    ],
    "secagg": [*SECAGG_COMMON, "secure_aggregation.enabled=true", "secure_aggregation.max_weight=64"],  # >= 32
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (exit code, stdout, run folder)} of RUNS."""
    return simulate_in_sequence(tmp_path_factory.mktemp("e2e-runs"), RUNS)


@pytest.fixture(scope="module")
def tiny_run(tiny_dp_run):
    return tiny_dp_run


def test_tiny_simulation_writes_the_documented_summary(tiny_run):
    proc, out = tiny_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["config"]["training"]["rounds"] == 2 and summary["config"]["model"]["name"] == "tiny"
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    orgs = {"org-0", "org-1", "org-2"}
    for record in summary["rounds"]:
        assert SUMMARY_ROUND_FIELDS <= set(record)
        assert 0.0 <= record["accuracy"] <= 1.0 and 0.0 <= record["macro_f1"] <= 1.0 and record["loss"] > 0
        assert set(record["epsilon"]) == orgs
    assert set(summary["privacy"]) == orgs
    for org, p in summary["privacy"].items():
        assert SUMMARY_PRIVACY_FIELDS <= set(p)
        assert p["clipping_mode"] == "bk"  # auto: the tiny BERT's trainable layers are all book-keeping layers
        # epsilon grows over rounds and ends at (not above) the target
        assert summary["rounds"][0]["epsilon"][org] < summary["rounds"][1]["epsilon"][org] == p["epsilon"]
        assert p["target_epsilon"] * 0.99 <= p["epsilon"] <= p["target_epsilon"]
    assert summary["final"] == summary["rounds"][-1]
    model = summary["model"]  # LoRA (the default): a small share of the weights trains and travels
    assert "(lora)" in proc.stdout and 0 < model["trainable_parameters"] < 0.1 * model["total_parameters"]
    # progress: one line per round, and the final per-organisation privacy
    assert proc.stdout.count("[round ") == 2 and "eps max" in proc.stdout
    assert "org-0: epsilon" in proc.stdout


def test_every_reported_epsilon_is_recomputable_from_the_record(tiny_run):
    _, out = tiny_run
    summary = json.loads((out / "summary.json").read_text())
    for org, p in summary["privacy"].items():
        recomputed = compute_epsilon(
            noise_multiplier=p["noise_multiplier"],
            sample_rate=p["sample_rate"],
            steps=p["steps"],
            delta=p["delta"],
            accountant=p["accountant"],
        )
        assert abs(recomputed - p["epsilon"]) <= 1e-9 * max(1.0, p["epsilon"]), org
        # the node's accountant state is on disk, where a restarted node picks it up
        assert (out / "nodes" / org / "accountant.json").is_file()


def test_the_runs_ledgers_are_complete_and_audit_clean(tiny_run):
    from fedpriv.privacy.audit import audit, load_ledger_set

    _, out = tiny_run
    summary = json.loads((out / "summary.json").read_text())
    result = audit(load_ledger_set([out]), prv=True)
    assert result.ok, result.to_dict()["findings"]
    assert {org.org for org in result.orgs} == set(summary["privacy"])
    for org in result.orgs:
        reported = summary["privacy"][org.org]["epsilon"]
        assert org.dp_rounds == 2 and org.claimed_epsilon == reported
        assert abs(org.recomputed_epsilon["rdp"] - reported) <= 0.01 * reported  # the 1%
        # the coordinator's copy is the node's own ledger, entry for entry
        node_copy = (out / "nodes" / org.org / "ledger.jsonl").read_text()
        assert (out / "ledgers" / f"{org.org}.jsonl").read_text() == node_copy
    assert summary["budget"]["refusals"] == [] and summary["budget"]["stopped_reason"] is None


def _ledger(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _kill_mid_round_two(out: Path, cwd: Path) -> list[str]:
    """Start `fedpriv simulate`, SIGKILL its whole process group once a node has trained round 2; who had."""
    log = open(cwd / "killed.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedpriv.cli", "simulate", *TINY_DP_RUN, "strategy.name=fedadam", "--out", str(out)],
        cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            ledgers = sorted((out / "nodes").glob("*/ledger.jsonl")) if (out / "nodes").is_dir() else []
            trained = [p.parent.name for p in ledgers if any(e["round"] == 2 for e in _ledger(p))]
            if trained:
                os.killpg(proc.pid, signal.SIGKILL)
                return trained
            time.sleep(0.02)
        raise AssertionError("the run ended before any node trained round 2: " + (cwd / "killed.log").read_text())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


def test_a_killed_coordinator_resumes_and_ends_where_an_uninterrupted_run_does(tiny_run, tmp_path):
    """Issue 6: kill -9 mid-round 2 (some nodes trained it), resume: no round lost or paid for twice.

    The run uses FedAdam, whose moments must come back after the restart; the reference is the FedAvg tiny run of
    the same data, batches and rounds: an organisation's epsilon depends on its plan, not on the strategy.
    """
    from fedpriv.privacy.audit import audit, load_ledger_set

    _, reference = tiny_run
    out = tmp_path / "run"
    trained_before_kill = _kill_mid_round_two(out, tmp_path)
    point = json.loads((out / "checkpoints" / "resume.json").read_text())
    assert point["round"] == 1, "killed after round 2 had ended: the kill did not land mid-round"

    proc = subprocess.run(
        [sys.executable, "-m", "fedpriv.cli", "simulate", "--resume", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming after round 1 of 2" in proc.stdout and proc.stdout.count("[round ") == 1
    assert "strategy state after round 1 restored: FedAdam.m_t, FedAdam.v_t" in proc.stdout
    assert "strategy fedadam" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    expected = json.loads((reference / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumes"] == [1] and summary["rejected_updates"] == []
    assert summary["config"]["strategy"]["name"] == "fedadam"
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert all(r["trained_orgs"] == ["org-0", "org-1", "org-2"] for r in summary["rounds"])
    for org, report in expected["privacy"].items():
        assert summary["privacy"][org]["epsilon"] == report["epsilon"], org  # exactly: the same steps, once each
        assert summary["privacy"][org]["steps"] == report["steps"], org
        kinds = [(e["kind"], e["round"]) for e in _ledger(out / "nodes" / org / "ledger.jsonl")]
        assert kinds == [("dp_round", 1), ("dp_round", 2)], (org, kinds)  # the replayed round: no second entry
    result = audit(load_ledger_set([out]), prv=False)
    assert result.ok, result.to_dict()["findings"]
    assert {o.org: o.recomputed_epsilon["rdp"] for o in result.orgs} == pytest.approx(
        {org: report["epsilon"] for org, report in expected["privacy"].items()}, rel=5e-3
    )  # dp-accounting's RDP: Opacus's claims within the two implementations' difference
    for org in trained_before_kill:  # their round-2 reply was stored before the kill, and sent again after it
        stored = json.loads((out / "nodes" / org / "train-reply.json").read_text())
        assert (stored["round"], stored["status"], stored["run"]) == (2, "done", str(out))


def test_organisation_level_dp_is_recorded_audited_and_stops_the_run_at_its_budget(runs):
    """The fixed-denominator clipped, noised sum (around FedProx); the coordinator's ledger; a budget that fits 2 of 3."""
    from fedpriv.privacy.audit import audit, load_ledger_set
    from fedpriv.privacy.recompute import rdp_epsilons

    code, stdout, out = runs["client_dp"]
    assert code == 1, stdout[-3000:]  # stopped at its budget
    assert "strategy fedprox" in stdout  # Flower's FedProx behind the organisation-level DP release
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "budget_exhausted" and len(summary["rounds"]) == 2
    # the noised aggregate goes back to the model's dtype: round 2's updates match it and are all aggregated
    assert summary["rejected_updates"] == [] and all(r["trained_orgs"] == ["org-0", "org-1"] for r in summary["rounds"])
    assert "client_dp.max_epsilon=10" in summary["budget"]["stopped_reason"]
    client = summary["client_dp"]
    assert client["rounds"] == 2 and client["level"] == "organisation"
    assert client["epsilon"] == pytest.approx(rdp_epsilons([(0.8, 1.0, 1)] * 2, 1e-5)[-1]) and client["epsilon"] <= 10
    result = audit(load_ledger_set([out]), prv=False)
    assert result.ok, result.to_dict()["findings"]
    coordinator = next(org for org in result.orgs if org.org == "coordinator")
    assert coordinator.dp_rounds == 2 and coordinator.claimed_epsilon == pytest.approx(client["epsilon"])
    for org, p in summary["privacy"].items():  # the example-level guarantees are reported beside it
        assert 0 < p["epsilon"] <= p["target_epsilon"], org


def test_run_files_metrics_plot_checkpoints_and_model(tiny_run):
    _, out = tiny_run
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["round"] for r in rows] == ["1", "2"] and "epsilon:org-1" in rows[0]
    assert (out / "progress.png").stat().st_size > 10_000
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "resume.json",  # the resume point after round 2 (FedAvg keeps no strategy state: no strategy-NNNN.npz)
        "round-0001.safetensors",
        "round-0002.safetensors",
    ]
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out / "model" / "merged")
    assert model.config.num_labels == 5
    assert (out / "model" / "adapter" / "adapter_config.json").is_file()


def test_minilm_learns_news_topics_under_dp(runs):
    """Two organisations, DP-SGD at epsilon 8 each, BBC News (shipped in a package, so this runs everywhere).

    The suite's one check that the pretrained MiniLM + LoRA pipeline learns real text; SST-2 utility (DP and
    not) is measured by benchmarks/utility_sst2.py (BENCHMARKS.md), whose smoke test runs in the suite.
    """
    code, stdout, out = runs["news"]
    assert code == 0, stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    # 5 topics: chance is about 0.2. Measured (`fedpriv simulate partitioning.num_orgs=2 data.max_examples=N
    # data.max_length=32 training.rounds=2 output.export_model=false`, mean-pooled head, 2026-12-06): 0.705 after
    # round 2 with N=560 (this test's), 0.833 with N=840; 0.4 is > 5 standard errors above chance on ~110 articles
    assert summary["final"]["accuracy"] > 0.4, summary["final"]
    for p in summary["privacy"].values():
        assert 0 < p["epsilon"] <= p["target_epsilon"] == 8.0


def _final_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(sorted((out / "checkpoints").iterdir())[-1]))


def _plain_fedavg(cfg, run_dir: Path) -> dict:
    """Round 1 of plain FedAvg, computed here: every organisation's ClientApp trains (same seed, same code as in
    the simulation's actors), the updates are averaged weighted by their training examples."""
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

    from fedpriv.client.client_app import handle_train
    from fedpriv.client.node import fresh_model
    from fedpriv.data.partitioning import plan_partitions
    from fedpriv.shared_models.weights import trainable_arrays

    model, digest = fresh_model(cfg.model, plan_partitions(cfg).label_names)
    total, weighted = 0, {}
    for partition in range(cfg.partitioning.num_orgs):
        config = ConfigRecord({protocol.SERVER_ROUND: 1, protocol.RUN_DIR: str(run_dir), protocol.BASE_DIGEST: digest})
        content = RecordDict({protocol.ARRAYS: trainable_arrays(model), protocol.CONFIG: config})
        context = Context(run_id=1, node_id=1, node_config={"partition-id": partition}, state=RecordDict(),
                          run_config={})  # fmt: skip
        reply = handle_train(cfg, Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN), context)
        n = int(reply.content[protocol.METRICS][protocol.NUM_EXAMPLES])
        total += n
        for key, array in reply.content[protocol.ARRAYS].to_torch_state_dict().items():
            weighted[key] = weighted.get(key, 0) + array.double() * n
    return {key: (value / total).to(torch.float32) for key, value in weighted.items()}


def test_secure_aggregation_gives_the_plain_aggregate_within_quantisation_error(runs, tmp_path, monkeypatch):
    """Same seed, DP off (reproducible local rounds): SecAgg+ must give plain FedAvg's aggregate."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedpriv.kernel.config import load_config

    for name in ("_run_id", "_node_id", "_task_id"):  # what Flower's runtime sets before messages are made
        monkeypatch.setattr(TaskIdentity, name, 1)

    code, stdout, secure = runs["secagg"]  # secure_aggregation.max_weight=64: >= each org's 32 examples
    assert code == 0, stdout[-3000:]
    assert "secure aggregation (SecAgg+): 3 shares" in stdout
    summary = json.loads((secure / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"][0]["trained_orgs"] == ["org-0", "org-1", "org-2"]
    a, b = _plain_fedavg(load_config(overrides=SECAGG_COMMON), tmp_path / "plain"), _final_weights(secure)
    assert a.keys() == b.keys()
    gap = max(float((a[k] - b[k]).abs().max()) for k in a)
    # one quantisation step, in weight units: 2 x clipping_range / quantization_range x max_weight / n
    smallest_org = 32  # 120 examples, 3 IID organisations, 20% held out for testing
    step = 2 * 8.0 / 2**22 * 64 / smallest_org
    assert gap <= 2 * step, (gap, step)
    assert all(b[k].dtype == torch.float32 for k in b)  # float32 again after the float64 aggregate


def test_the_summary_and_the_report_carry_per_class_scores_and_the_confusion_matrix(tiny_run):
    proc, out = tiny_run
    summary = json.loads((out / "summary.json").read_text())
    final, labels = summary["final"], summary["label_names"]
    matrix = final["confusion_matrix"]  # rows: true class, columns: predicted, in the run's class order
    assert len(matrix) == len(labels) == 5 and all(len(row) == 5 for row in matrix)
    test_examples = 60  # 300 examples, 3 IID organisations, 20% of each held out for testing
    assert sum(map(sum, matrix)) == test_examples
    assert sum(matrix[i][i] for i in range(5)) / test_examples == pytest.approx(final["accuracy"])
    assert [row["label"] for row in final["per_class"]] == labels
    assert [row["support"] for row in final["per_class"]] == [sum(row) for row in matrix]
    for i, row in enumerate(final["per_class"]):
        predicted = sum(matrix[t][i] for t in range(5))
        assert row["precision"] == (pytest.approx(matrix[i][i] / predicted) if predicted else None)
    assert all(r["confusion_matrix"] and r["per_class"] for r in summary["rounds"])  # every round, not only final
    assert (out / "confusion.png").stat().st_size > 5_000
    assert "Per class (precision / recall / F1; test examples):" in proc.stdout
    assert f"  {labels[0]}" in proc.stdout and "progress.png, confusion.png, model/" in proc.stdout


def test_each_node_says_its_progress_inside_a_round_throttled(tiny_run):
    """The shared run sets FEDPRIV_PROGRESS_S=0.05 (tests.shared_runs): the nodes' lines reach the user through
    Ray's log forwarding with the default (non-verbose) settings, at most one per step."""
    proc, out = tiny_run
    import re

    output = proc.stdout + proc.stderr
    progress = re.findall(r"\[(org-\d) round (\d)/2\] training: step (\d+)/(\d+) \(\d+%\), [\d.]+ examples/s", output)
    closing = re.findall(r"\[(org-\d) round (\d)/2\] trained: (\d+) steps, \d+ examples in \dm\d\ds", output)
    assert progress and closing, output[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["privacy"]["org-0"]["steps"] // 2  # steps per round (identical IID organisations)
    assert all(int(done) <= int(planned) == steps for *_, done, planned in progress)
    for org, rnd in {(org, rnd) for org, rnd, *_ in progress}:
        assert sum((o, r) == (org, rnd) for o, r, *_ in progress) <= steps  # throttled: at most one per step
        assert (org, rnd, str(steps)) in closing  # a round that said its progress closes it


def test_auditing_the_dp_off_run_says_it_has_no_guarantee(runs, capsys):
    from fedpriv.cli import main

    code, stdout, secure = runs["secagg"]  # privacy.enabled=false
    assert code == 0, stdout[-3000:]
    assert main(["audit", str(secure), "--out", str(secure / "audit")]) == 3
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "this run had DP off" in err and "no privacy guarantee to audit" in err
