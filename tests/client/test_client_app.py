"""The ClientApp's handlers on real Flower messages: reply records, budget refusal, base-model check."""

from __future__ import annotations

import json

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedpriv.client.client_app import handle_evaluate, handle_query, handle_train
from fedpriv.client.node import NodeSetupError, fresh_model
from fedpriv.data.partitioning import plan_partitions
from fedpriv.kernel import protocol
from fedpriv.kernel.config import load_config
from fedpriv.privacy.calibration import compute_epsilon
from fedpriv.shared_models.weights import trainable_arrays
from tests.handler_messages import HANDLER_RUN, node_message, partition_context

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def test_train_reply_carries_weights_metrics_and_the_privacy_spent(tmp_path):
    cfg = load_config(overrides=HANDLER_RUN)
    reply = handle_train(cfg, node_message(cfg, tmp_path, 1), partition_context())
    content = reply.content
    assert len(content.array_records) == 1 and len(content.metric_records) == 1  # what Flower's strategies require
    metrics = content[protocol.METRICS]
    assert metrics[protocol.NUM_EXAMPLES] == len(plan_partitions(cfg).org(0).train)
    report = content[protocol.PRIVACY]
    assert report["org"] == "org-0" and report["dp_enabled"] is True
    assert report["steps"] == metrics[protocol.DP_STEPS] > 0
    assert report["epsilon"] == pytest.approx(
        compute_epsilon(
            noise_multiplier=report["noise_multiplier"], sample_rate=report["sample_rate"], steps=report["steps"],
            delta=report["delta"], accountant=report["accountant"],
        )
    )  # fmt: skip
    assert (tmp_path / "nodes" / "org-0" / "accountant.json").is_file()


def test_node_refuses_a_round_beyond_its_budget_with_a_typed_reply_and_a_ledger_entry(tmp_path):
    import json

    from fedpriv.privacy.accountant_state import NodePrivacy
    from fedpriv.privacy.ledger import NodeLedger, load_signing_key

    cfg = load_config(overrides=HANDLER_RUN)
    for server_round in (1, 2):  # the planned participation
        reply = handle_train(cfg, node_message(cfg, tmp_path, server_round), partition_context())
        assert protocol.ARRAYS in reply.content and protocol.REFUSAL not in reply.content
    folder = tmp_path / "nodes" / "org-0"
    steps_before = NodePrivacy.open(folder, _stored_plan(folder)).steps
    reply = handle_train(cfg, node_message(cfg, tmp_path, 3), partition_context())
    refusal = reply.content[protocol.REFUSAL]
    assert protocol.ARRAYS not in reply.content
    assert refusal["org"] == "org-0" and refusal["epsilon-if-trained"] > refusal["max-epsilon"] == 8.0
    assert "max_epsilon=8" in refusal["reason"]
    assert NodePrivacy.open(folder, _stored_plan(folder)).steps == steps_before  # no DP step was taken
    ledger = NodeLedger.open(folder, "org-0", load_signing_key(folder / "ledger.key"))  # verifies the chain
    assert [(e["kind"], e["round"]) for e in ledger.entries] == [("dp_round", 1), ("dp_round", 2), ("refusal", 3)]
    assert ledger.entries[1]["epsilon"] <= 8.0 < ledger.entries[2]["epsilon_if_trained"]
    record = reply.content[protocol.LEDGER]
    assert [e["seq"] for e in json.loads(record[protocol.LEDGER_ENTRIES])] == [1, 2, 3]  # the server held none
    assert record[protocol.LEDGER_CAN_TRAIN] is False


def test_a_diverged_update_is_never_sent_and_its_privacy_spending_stays_recorded(tmp_path, monkeypatch):
    import fedpriv.client.training
    from fedpriv.privacy.ledger import NodeLedger, load_signing_key

    real = fedpriv.client.training.train_locally

    def diverging(model, *args, **kwargs):
        result = real(model, *args, **kwargs)
        next(p for p in model.parameters() if p.requires_grad).data.fill_(float("nan"))
        return result

    monkeypatch.setattr("fedpriv.client.task.train_locally", diverging)
    cfg = load_config(overrides=HANDLER_RUN)
    reply = handle_train(cfg, node_message(cfg, tmp_path, 1), partition_context())
    assert protocol.ARRAYS not in reply.content  # the weights never leave
    diverged = reply.content[protocol.DIVERGED]
    assert diverged["org"] == "org-0" and diverged["kind"] == "update"
    assert diverged["reason"].startswith("the update became non-finite (NaN/Inf) in ")
    assert diverged["reason"].endswith(f"lower training.learning_rate ({cfg.training.learning_rate:g})")
    folder = tmp_path / "nodes" / "org-0"
    ledger = NodeLedger.open(folder, "org-0", load_signing_key(folder / "ledger.key"))
    assert [(e["kind"], e["round"]) for e in ledger.entries] == [("dp_round", 1)]  # spent, and on record
    assert [e["seq"] for e in json.loads(reply.content[protocol.LEDGER][protocol.LEDGER_ENTRIES])] == [1]  # and sent
    assert reply.content[protocol.PRIVACY]["steps"] == ledger.entries[0]["local_steps"] > 0
    with pytest.raises(NodeSetupError, match="was trained and recorded"):  # asked again: never trained twice
        handle_train(cfg, node_message(cfg, tmp_path, 1), partition_context())


def _stored_plan(folder):
    from fedpriv.privacy.calibration import PrivacyPlan

    return PrivacyPlan.from_dict(json.loads((folder / "privacy_plan.json").read_text()))


def test_a_different_base_model_is_refused(tmp_path):
    cfg = load_config(overrides=HANDLER_RUN)
    with pytest.raises(NodeSetupError, match="base model differs"):
        handle_train(cfg, node_message(cfg, tmp_path, 1, digest="0" * 64), partition_context())


def test_evaluate_reply_has_counts_for_exact_global_metrics(tmp_path):
    cfg = load_config(overrides=HANDLER_RUN)
    reply = handle_evaluate(
        cfg, node_message(cfg, tmp_path, 1, MessageType.EVALUATE), partition_context(partition_id=1)
    )
    metrics = reply.content[protocol.METRICS]
    n = metrics[protocol.NUM_EXAMPLES]
    assert n == len(plan_partitions(cfg).org(1).test)
    assert reply.content[protocol.ORG]["name"] == "org-1"
    labels = len(plan_partitions(cfg).label_names)
    assert sum(metrics[protocol.class_count_key("tp", i)] for i in range(labels)) == metrics[protocol.EVAL_CORRECT]
    assert (
        sum(
            metrics[protocol.class_count_key("tp", i)] + metrics[protocol.class_count_key("fn", i)]
            for i in range(labels)
        )
        == n
    )


def _own_data_node(tmp_path, target_epsilon=2.0):
    rows = ["text,label"] + [
        f"{'great fine good' if i % 2 else 'awful bad poor'} item {i},{'pos' if i % 2 else 'neg'}" for i in range(60)
    ]
    (tmp_path / "notes.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "node.yaml").write_text(
        "org: hospital-a\n"
        "data: {path: notes.csv, text_column: text, label_column: label, test_fraction: 0.25}\n"
        f"privacy: {{target_epsilon: {target_epsilon}, delta: 1.0e-3}}\n"
        "device: cpu\n"
        "state_dir: private-state\n"
    )
    node_config = {"node-config": str(tmp_path / "node.yaml")}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def test_deployment_node_uses_its_own_data_budget_and_state_folder(tmp_path):
    cfg = load_config(
        overrides=[
            "model.name=tiny", "training.rounds=2", "training.batch_size=16", "data.max_length=16",
            "data.labels.names=[neg, pos]", "privacy.target_epsilon=50",  # the coordinator's wish: ignored
        ]
    )  # fmt: skip
    context = _own_data_node(tmp_path, target_epsilon=2.0)
    model, digest = fresh_model(cfg.model, ["neg", "pos"])
    config = ConfigRecord(
        {protocol.SERVER_ROUND: 1, protocol.RUN_DIR: str(tmp_path / "server-run"), protocol.BASE_DIGEST: digest}
    )
    msg = Message(
        content=RecordDict({protocol.ARRAYS: trainable_arrays(model), protocol.CONFIG: config}),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )
    report = handle_train(cfg, msg, context).content[protocol.PRIVACY]
    assert report["org"] == "hospital-a" and report["target_epsilon"] == 2.0 and report["delta"] == 1e-3
    assert 0 < report["epsilon"] <= 2.0
    assert (tmp_path / "private-state" / "accountant.json").is_file()
    assert not (tmp_path / "server-run").exists()  # the server's folder is not where a real node keeps its state
    assert handle_train(cfg, msg, context).content[protocol.METRICS][protocol.NUM_EXAMPLES] == 45


def test_deployment_needs_the_federation_class_names(tmp_path):
    cfg = load_config(overrides=["model.name=tiny", "training.batch_size=16"])
    with pytest.raises(NodeSetupError, match="data.labels.names"):
        handle_train(cfg, node_message(load_config(overrides=HANDLER_RUN), tmp_path, 1), _own_data_node(tmp_path))


def test_more_local_epochs_than_planned_cannot_overspend(tmp_path):
    """A later run config asking for 3 local epochs on the same node state: the node refuses round 2."""
    cfg = load_config(overrides=HANDLER_RUN)
    handle_train(cfg, node_message(cfg, tmp_path, 1), partition_context())
    greedy = load_config(overrides=[*HANDLER_RUN, "training.local_epochs=3"])
    reply = handle_train(greedy, node_message(greedy, tmp_path, 2), partition_context())
    assert protocol.ARRAYS not in reply.content
    refusal = reply.content[protocol.REFUSAL]
    assert refusal["epsilon-if-trained"] > refusal["max-epsilon"]
    last = json.loads((tmp_path / "nodes" / "org-0" / "ledger.jsonl").read_text().splitlines()[-1])
    first = json.loads((tmp_path / "nodes" / "org-0" / "ledger.jsonl").read_text().splitlines()[0])
    per_epoch = first["local_steps"] // cfg.training.local_epochs
    assert last["kind"] == "refusal" and last["requested_steps"] == 3 * per_epoch


def test_legacy_fit_records_of_the_secagg_workflow_train_the_same_model(tmp_path):
    """SecAgg+ sends unnamed ``fitins`` arrays; the node trains and answers ``fitres`` with its privacy report."""
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat
    from flwr.compat.common.typing import FitIns

    from fedpriv.client.node import trainable_layout
    from fedpriv.kernel.legacy_messages import flat_vector, legacy_fit_metrics_to_content, split_vector

    cfg = load_config(overrides=HANDLER_RUN)
    labels = plan_partitions(cfg).label_names
    model, digest = fresh_model(cfg.model, labels)
    layout = trainable_layout(cfg.model, labels)
    names = [name for name, _ in layout]
    state = dict(model.named_parameters())
    ins = FitIns(
        parameters=ndarrays_to_parameters([flat_vector([state[n].detach().numpy() for n in names])]),
        config={protocol.SERVER_ROUND: 1, protocol.RUN_DIR: str(tmp_path), protocol.BASE_DIGEST: digest},
    )
    msg = Message(
        content=compat.fitins_to_recorddict(ins, keep_input=True), dst_node_id=1, message_type=MessageType.TRAIN
    )
    fitres = compat.recorddict_to_fitres(handle_train(cfg, msg, partition_context()).content, keep_input=True)
    (vector,) = parameters_to_ndarrays(fitres.parameters)  # one flat vector, as the coordinator sent
    updated = split_vector([vector], layout)
    assert [u.shape for u in updated] == [tuple(state[n].shape) for n in names]
    assert any(not (u == state[n].detach().numpy()).all() for u, n in zip(updated, names, strict=True))
    report = legacy_fit_metrics_to_content(dict(fitres.metrics))[protocol.PRIVACY]
    assert report["org"] == "org-0" and 0 < report["epsilon"] <= report["target_epsilon"]
    assert fitres.num_examples == len(plan_partitions(cfg).org(0).train)


def test_each_round_trains_at_its_scheduled_learning_rate(tmp_path, monkeypatch):
    import fedpriv.client.task

    seen = []
    real = fedpriv.client.task.train_locally

    def spy(model, data, *, cfg, **kwargs):
        seen.append(cfg.learning_rate)
        return real(model, data, cfg=cfg, **kwargs)

    monkeypatch.setattr(fedpriv.client.task, "train_locally", spy)
    cfg = load_config(overrides=[*HANDLER_RUN, "training.lr_schedule=cosine", "training.learning_rate=0.02"])
    for server_round in (1, 2):
        handle_train(cfg, node_message(cfg, tmp_path, server_round), partition_context())
    assert seen == [pytest.approx(0.02), pytest.approx(0.002)]  # 2 rounds: the first at the rate, the last at its floor


def test_the_preflight_reply_loads_the_node_plans_its_noise_once_and_spends_nothing(tmp_path):
    cfg = load_config(overrides=HANDLER_RUN)
    query = lambda: Message(  # noqa: E731 - what server/preflight.py sends: the run's config, no weights
        RecordDict({protocol.CONFIG: ConfigRecord({protocol.RUN_DIR: str(tmp_path)})}),
        dst_node_id=1,
        message_type=MessageType.QUERY,
    )
    ready = handle_query(cfg, query(), partition_context()).content[protocol.READY]
    folder = tmp_path / "nodes" / "org-0"
    plan = _stored_plan(folder)  # calibrated and stored by the pre-flight, before any training message
    assert ready[protocol.READY_ORG] == "org-0"
    assert ready[protocol.READY_TRAIN] == len(plan_partitions(cfg).org(0).train) == plan.num_examples
    assert ready[protocol.READY_TEST] == len(plan_partitions(cfg).org(0).test)
    assert (
        ready[protocol.READY_NOISE] == plan.noise_multiplier and ready[protocol.READY_SAMPLE_RATE] == plan.sample_rate
    )
    assert ready[protocol.READY_PLANNED_STEPS] == plan.planned_steps and ready[protocol.READY_TARGET_EPSILON] == 8.0
    assert not (folder / "ledger.jsonl").exists() or not (folder / "ledger.jsonl").read_text().strip()
    reply = handle_train(
        cfg, node_message(cfg, tmp_path, 1), partition_context()
    )  # round 1 trains on the pre-flight's plan
    assert reply.content[protocol.PRIVACY]["noise_multiplier"] == plan.noise_multiplier
    assert ready[protocol.READY_EPSILON] == 0.0 and ready[protocol.READY_MAX_EPSILON] == 8.0
    again = handle_query(cfg, query(), partition_context()).content[
        protocol.READY
    ]  # e.g. a resumed run: the stored plan
    assert again[protocol.READY_NOISE] == plan.noise_multiplier
    assert again[protocol.READY_EPSILON] == reply.content[protocol.PRIVACY]["epsilon"] > 0


def test_without_dp_the_preflight_reports_the_data_only(tmp_path):
    cfg = load_config(overrides=[*HANDLER_RUN, "privacy.enabled=false"])
    message = Message(RecordDict({protocol.CONFIG: ConfigRecord({})}), dst_node_id=1, message_type=MessageType.QUERY)
    content = handle_query(cfg, message, partition_context(1)).content
    assert dict(content[protocol.READY]) == {
        protocol.READY_ORG: "org-1",
        protocol.READY_TRAIN: len(plan_partitions(cfg).org(1).train),
        protocol.READY_TEST: len(plan_partitions(cfg).org(1).test),
        protocol.READY_MAX_LENGTH: 32,  # data.max_length: a setting (the exported model records it)
    }
    assert list(content) == [protocol.READY] and not (tmp_path / "nodes").exists()
