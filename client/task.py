"""The node's work for one message: set up its data and model, train with DP, evaluate.

Kept apart from ``client_app.py`` so that a ClientApp process that only runs
a SecAgg+ key-exchange stage never imports torch, transformers or Opacus:
under a SuperNode every message is a fresh process.
"""

from __future__ import annotations

import dataclasses
import json

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from fedpriv.client import replay
from fedpriv.client.budget import NodeBudget, round_steps
from fedpriv.client.device import resolve_device
from fedpriv.client.evaluation import evaluate
from fedpriv.client.node import LocalNode, NodeSetupError, fresh_model, local_node, state_dir, trainable_layout
from fedpriv.client.progress import RoundProgress
from fedpriv.client.stage_timing import phase
from fedpriv.client.training import TrainingDiverged, round_learning_rate, train_locally
from fedpriv.kernel import protocol
from fedpriv.kernel.config import FedPrivConfig
from fedpriv.privacy.accountant_state import NodePrivacy
from fedpriv.shared_models.weights import arrays_digest, load_trainable, trainable_state


def prepare(cfg: FedPrivConfig, content: RecordDict, context: Context) -> tuple[LocalNode, torch.nn.Module]:
    """The node's data and a model holding the global weights from ``content``."""
    with phase("data"):
        node = local_node(cfg, context)
    with phase("model"):
        model, digest = fresh_model(cfg.model, node.label_names)
    server_config = content[protocol.CONFIG]
    expected = server_config.get(protocol.BASE_DIGEST)
    if expected and expected != digest:
        raise NodeSetupError(
            f"organisation '{node.org}': base model differs from the server's (digest {digest[:12]} vs"
            f" {str(expected)[:12]}): check model.name and model.init_seed"
        )
    load_trainable(model, content[protocol.ARRAYS])
    return node, model


def train_content(cfg: FedPrivConfig, content: RecordDict, context: Context) -> RecordDict:
    """Train with DP and record the round in the node's ledger, or refuse (recorded too) when over budget."""
    node, model = prepare(cfg, content, context)
    server_config = content[protocol.CONFIG]
    server_round = int(server_config[protocol.SERVER_ROUND])
    heads = server_config.get(protocol.LEDGER_HEADS)
    device = resolve_device(node.device)
    model_digest = arrays_digest(content[protocol.ARRAYS])
    budget = attempt = None
    if cfg.privacy.enabled:
        folder = state_dir(node, str(server_config.get(protocol.RUN_DIR, "")))
        attempt = replay.TrainAttempt(str(server_config.get(protocol.RUN_DIR, "")), server_round, model_digest)
        with phase("privacy"):
            budget = NodeBudget.open(cfg, node, folder)
            ledger_length = len(budget.ledger.entries)
            # a round the coordinator lost and asks for again: the same reply, nothing spent (before the budget
            # check: the round is already paid for)
            stored = replay.previous_reply(folder, attempt, ledger_length, node.org)
            if stored is not None:
                return _replayed(cfg, node, budget, stored, heads)
            # the steps this round will really take, whatever the server asks (more local epochs, more rounds)
            refusal = budget.check(server_round, round_steps(cfg, len(node.train)))
        if refusal is not None:
            budget.record_refusal(refusal)
            return RecordDict(
                {
                    protocol.REFUSAL: ConfigRecord(
                        {
                            "org": node.org,
                            "reason": refusal.reason,
                            "epsilon": refusal.epsilon,
                            "epsilon-if-trained": refusal.epsilon_if_trained,
                            "max-epsilon": refusal.max_epsilon,
                        }
                    ),
                    protocol.LEDGER: budget.report(cfg, heads),
                    protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 0}),
                }
            )
        steps_before = budget.privacy.steps
        replay.begin(folder, attempt, ledger_length)
    learning_rate = round_learning_rate(cfg.training, server_round)
    progress = RoundProgress(node.org, server_round, cfg.training.rounds)  # the node's own output, never sent
    try:
        with phase("train"):
            result = train_locally(
                model,
                node.train,
                cfg=dataclasses.replace(cfg.training, learning_rate=learning_rate),
                pad_token_id=node.pad_token_id,
                device=device,
                privacy=None if budget is None else budget.privacy,
                grad_sample_mode=cfg.privacy.grad_sample_mode,
                proximal_mu=float(server_config.get(protocol.PROXIMAL_MU, 0.0)),
                seed=cfg.run.seed * 100_003 + server_round,
                canaries=_gradient_canaries(cfg, node, model),
                progress=progress,
            )
    except TrainingDiverged as exc:
        progress.stopped(str(exc))
        if budget is not None and budget.privacy.steps > steps_before:
            # the steps taken before it are spent: recorded, and their entry travels with the reply
            budget.record_round(server_round, steps_before, model_digest, node.redaction, stopped="diverged")
        return _diverged(cfg, node, budget, heads, exc.step, exc.kind, str(exc), learning_rate)
    progress.finish(result.steps, result.examples_seen)
    metrics = {
        protocol.NUM_EXAMPLES: len(node.train),
        protocol.DP_STEPS: result.steps,
        protocol.UNIT_WEIGHT: 1,
    }
    if node.sharing.training_loss:  # exact, before clipping and noise: only where the organisation allows it
        metrics[protocol.TRAIN_LOSS] = result.mean_loss
    state = trainable_state(model)  # checked as tensors, then serialised once: no copy back from the bytes
    diverged = [name for name, tensor in state.items() if not bool(torch.isfinite(tensor).all())]
    if diverged:  # the steps were taken and stay recorded (conservatively: nothing leaves); the weights never leave
        if budget is not None:
            budget.record_round(server_round, steps_before, model_digest, node.redaction)
        more = f" and {len(diverged) - 1} more tensor(s)" if len(diverged) > 1 else ""
        what = f"the update became non-finite (NaN/Inf) in {diverged[0]}{more} after step {result.steps}"
        return _diverged(cfg, node, budget, heads, result.steps, "update", what, learning_rate)
    records = {}
    if budget is not None:
        # the reply is stored before its ledger entry, and marked done after it: whatever instant the node or
        # the coordinator stops at, a repeat of this round is either answered with this reply (its spending is
        # recorded) or trained afresh (nothing was recorded, and nothing had left the node)
        with phase("privacy"):
            replay.store(folder, attempt, ledger_length, state, metrics, result.clipping_mode)
        budget.record_round(server_round, steps_before, model_digest, node.redaction)
        with phase("privacy"):
            replay.mark_done(folder)
        report = {"org": node.org, "dp_enabled": True, **budget.privacy.report(), "max_epsilon": node.max_epsilon}
        report["clipping_mode"] = result.clipping_mode
        records[protocol.LEDGER] = budget.report(cfg, heads)
    else:
        report = {"org": node.org, "dp_enabled": False}
    report[protocol.REDACTION] = json.dumps(node.redaction, sort_keys=True)
    return RecordDict(
        {
            protocol.ARRAYS: ArrayRecord(torch_state_dict=state),
            protocol.METRICS: MetricRecord(metrics),
            protocol.PRIVACY: ConfigRecord(report),
            **records,
        }
    )


def _diverged(
    cfg: FedPrivConfig,
    node: LocalNode,
    budget: NodeBudget | None,
    heads: str | None,
    step: int,
    kind: str,
    what: str,
    learning_rate: float,
) -> RecordDict:
    """The reply of a round whose training stopped being finite: why and at which step, never the weights.

    With ``budget`` (DP on) the privacy report and the ledger record (the round's entry, when steps were taken)
    travel with it, so the coordinator's copy and the summary show what was spent; the coordinator stops the run.
    """
    reason = f"{what}: lower training.learning_rate ({learning_rate:g})"
    if budget is not None:
        report = {"org": node.org, "dp_enabled": True, **budget.privacy.report(), "max_epsilon": node.max_epsilon}
    else:
        report = {"org": node.org, "dp_enabled": False}
    report[protocol.REDACTION] = json.dumps(node.redaction, sort_keys=True)
    records = {
        protocol.DIVERGED: ConfigRecord({"org": node.org, "reason": reason, "step": step, "kind": kind}),
        protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 0}),
        protocol.PRIVACY: ConfigRecord(report),
    }
    if budget is not None:
        records[protocol.LEDGER] = budget.report(cfg, heads)
    return RecordDict(records)


def _gradient_canaries(cfg: FedPrivConfig, node: LocalNode, model: torch.nn.Module):
    """The Dirac canaries of a simulation's gradient canary audit, for the audited organisation only (else None)."""
    if not (node.audited and cfg.canary_audit.enabled and cfg.canary_audit.kind == "gradient"):
        return None
    from fedpriv.privacy.audit_canaries import gradient_canaries_for  # a simulation's canary audit only

    return gradient_canaries_for(cfg, sum(p.numel() for p in model.parameters() if p.requires_grad))


def _replayed(
    cfg: FedPrivConfig, node: LocalNode, budget: NodeBudget, stored: replay.StoredReply, heads: str | None
) -> RecordDict:
    """The stored reply of a round trained before, with today's ledger outlook: no step taken, no entry added."""
    report = {"org": node.org, "dp_enabled": True, **budget.privacy.report(), "max_epsilon": node.max_epsilon}
    report["clipping_mode"] = stored.clipping_mode
    report[protocol.REDACTION] = json.dumps(node.redaction, sort_keys=True)
    return RecordDict(
        {
            protocol.ARRAYS: ArrayRecord(torch_state_dict=stored.tensors),
            protocol.METRICS: MetricRecord(_shared_train_metrics(node, stored.metrics)),
            protocol.PRIVACY: ConfigRecord(report),
            protocol.LEDGER: budget.report(cfg, heads),
        }
    )


def _shared_train_metrics(node: LocalNode, metrics: dict) -> dict:
    """A stored reply's metrics as the organisation's settings today let them leave (a reply stored before the
    training loss was turned off, or by an older fedpriv, held it)."""
    if node.sharing.training_loss:
        return dict(metrics)
    return {key: value for key, value in metrics.items() if key != protocol.TRAIN_LOSS}


def ledger_report(cfg: FedPrivConfig, content: RecordDict, context: Context) -> ConfigRecord | None:
    """The LEDGER record for an evaluate reply (entries a lost train reply did not deliver, and the outlook)."""
    if not cfg.privacy.enabled:
        return None
    node = local_node(cfg, context)
    server_config = content[protocol.CONFIG]
    folder = state_dir(node, str(server_config.get(protocol.RUN_DIR, "")))
    if not NodePrivacy.has_plan(folder):
        return None  # never trained: nothing spent, nothing to report
    with phase("privacy"):
        budget = NodeBudget.open(cfg, node, folder, calibrate=False)
        return budget.report(cfg, server_config.get(protocol.LEDGER_HEADS))


def evaluate_content(cfg: FedPrivConfig, content: RecordDict, context: Context) -> RecordDict:
    node, model = prepare(cfg, content, context)
    with phase("evaluate"):
        counts = evaluate(
            model,
            node.test,
            num_labels=len(node.label_names),
            batch_size=cfg.training.eval_batch_size,
            pad_token_id=node.pad_token_id,
            device=resolve_device(node.device),
        )
    values: dict[str, int | float] = {
        protocol.NUM_EXAMPLES: counts.num_examples,
        protocol.EVAL_LOSS_SUM: counts.loss_sum,
        protocol.EVAL_CORRECT: counts.correct,
        protocol.UNIT_WEIGHT: 1,
    }
    if node.sharing.per_class_eval:  # macro-F1, per-class scores, confusion matrix: they reveal the test split's
        for index in range(len(node.label_names)):  # label counts and which classes the model confuses there
            values[protocol.class_count_key("tp", index)] = counts.true_positive[index]
            values[protocol.class_count_key("fp", index)] = counts.false_positive[index]
            values[protocol.class_count_key("fn", index)] = counts.false_negative[index]
            for predicted, cell in enumerate(counts.confusion[index]):
                values[protocol.confusion_key(index, predicted)] = cell
    org = ConfigRecord({"name": node.org, protocol.REDACTION: json.dumps(node.redaction, sort_keys=True)})
    reply = RecordDict({protocol.METRICS: MetricRecord(values), protocol.ORG: org})
    ledger = ledger_report(cfg, content, context)
    if ledger is not None:
        reply[protocol.LEDGER] = ledger
    return reply


def ready_content(cfg: FedPrivConfig, content: RecordDict, context: Context) -> RecordDict:
    """The pre-flight reply: load the node's data, open (or calibrate) its privacy plan, report them.

    What a run's first round would otherwise do before training (redacting and tokenising the data, cached in
    the node's state; the noise calibration, stored with its plan) happens here, once per run; under
    fedpriv-supernode the node's run process loads the data and builds the model template meanwhile
    (fedpriv/runtime/superexec.py), which this message does not repeat. The coordinator learns each node's data
    sizes, plan and spending before round 1 (server/preflight.py). Nothing is spent, and no ledger
    entry travels: whether a node trains is still its own decision in each round (a resumed round it already
    paid for is answered again, whatever its budget now says).
    """
    with phase("data"):
        node = local_node(cfg, context)
    ready: dict[str, int | float | str] = {
        protocol.READY_ORG: node.org,
        protocol.READY_TRAIN: len(node.train),
        protocol.READY_TEST: len(node.test),
    }
    if node.max_length is not None:  # a setting: the exported model records what its nodes trained at
        ready[protocol.READY_MAX_LENGTH] = node.max_length
    if cfg.privacy.enabled:
        folder = state_dir(node, str(content[protocol.CONFIG].get(protocol.RUN_DIR, "")))
        with phase("privacy"):
            budget = NodeBudget.open(cfg, node, folder)  # calibrates the noise if no plan is stored yet
        plan = budget.privacy.plan
        ready |= {
            protocol.READY_NOISE: plan.noise_multiplier,
            protocol.READY_SAMPLE_RATE: plan.sample_rate,
            protocol.READY_PLANNED_STEPS: plan.planned_steps,
            protocol.READY_TARGET_EPSILON: plan.target_epsilon,
            protocol.READY_DELTA: plan.delta,
            protocol.READY_EPSILON: budget.privacy.epsilon(),
            protocol.READY_MAX_EPSILON: node.max_epsilon,
        }
    return RecordDict({protocol.READY: ConfigRecord(ready)})


def node_trainable_layout(cfg: FedPrivConfig, context: Context) -> list[tuple[str, tuple[int, ...]]]:
    return trainable_layout(cfg.model, local_node(cfg, context).label_names)


def warm_node(cfg: FedPrivConfig, context: Context) -> None:
    """Load the node's data and the model template into this process's caches (client/node.py), nothing else."""
    node = local_node(cfg, context)
    trainable_layout(cfg.model, node.label_names)
