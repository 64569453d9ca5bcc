"""The organisation's Flower ClientApp: DP local training and local evaluation.

One ClientApp for simulation and deployment. ``fedpriv simulate`` builds it
with the resolved config (``build_client_app(cfg)``); under ``flwr run`` the
module-level ``app`` reads ``config``/``overrides`` from the run config.
"""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.device import resolve_device
from client.evaluation import evaluate
from client.node import (
    LocalNode,
    NodeSetupError,
    fresh_model,
    local_node,
    org_privacy_plan,
    state_dir,
    trainable_names,
)
from client.training import train_locally
from fedpriv import protocol
from fedpriv.config import FedPrivConfig
from fedpriv.legacy_messages import (
    evaluate_reply_to_legacy,
    fit_reply_to_legacy,
    is_legacy_evaluate,
    is_legacy_fit,
    legacy_evaluate_to_content,
    legacy_fit_to_content,
)
from fedpriv.quiet import quiet_flower_debug, quiet_third_party_warnings
from fedpriv.run_config import config_from_context
from privacy.accountant_state import NodePrivacy
from privacy.calibration import dp_steps_per_epoch
from shared_models.weights import load_trainable, trainable_arrays

SECAGG_CONFIGS = "secaggplus_configs"  # the ConfigRecord Flower's SecAgg+ workflow adds to its messages


def _prepare(cfg: FedPrivConfig, content: RecordDict, context: Context) -> tuple[LocalNode, torch.nn.Module]:
    """The node's data and a model holding the global weights from ``content``."""
    node = local_node(cfg, context)
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


def _train(cfg: FedPrivConfig, content: RecordDict, context: Context) -> RecordDict:
    node, model = _prepare(cfg, content, context)
    server_config = content[protocol.CONFIG]
    server_round = int(server_config[protocol.SERVER_ROUND])
    device = resolve_device(node.device)
    privacy = None
    if cfg.privacy.enabled:
        folder = state_dir(node, str(server_config.get(protocol.RUN_DIR, "")))
        plan = org_privacy_plan(cfg, node.org, len(node.train), target=(node.target_epsilon, node.delta))
        privacy = NodePrivacy.open(folder, plan)
        # The steps this round will really take (the server may ask for more local epochs than planned).
        steps = cfg.training.local_epochs * dp_steps_per_epoch(len(node.train), cfg.training.batch_size)
        after = privacy.epsilon_after(steps)
        if after > privacy.plan.target_epsilon:
            # Never spend past the budget, whatever the server asks.
            raise NodeSetupError(
                f"organisation '{node.org}' refuses round {server_round}: epsilon would reach {after:.4f},"
                f" above its target {privacy.plan.target_epsilon} (planned {privacy.plan.planned_rounds} rounds)"
            )
    result = train_locally(
        model,
        node.train,
        cfg=cfg.training,
        pad_token_id=node.pad_token_id,
        device=device,
        privacy=privacy,
        grad_sample_mode=cfg.privacy.grad_sample_mode,
        proximal_mu=float(server_config.get(protocol.PROXIMAL_MU, 0.0)),
        seed=cfg.run.seed * 100_003 + server_round,
    )
    if privacy is not None:
        privacy.save()
        report = privacy.report()
    else:
        report = {"dp_enabled": False}
    report = {"org": node.org, "dp_enabled": privacy is not None, **report}
    metrics = MetricRecord(
        {
            protocol.NUM_EXAMPLES: len(node.train),
            protocol.TRAIN_LOSS: result.mean_loss,
            protocol.DP_STEPS: result.steps,
        }
    )
    return RecordDict(
        {
            protocol.ARRAYS: trainable_arrays(model),
            protocol.METRICS: metrics,
            protocol.PRIVACY: ConfigRecord(report),
        }
    )


def _evaluate(cfg: FedPrivConfig, content: RecordDict, context: Context) -> RecordDict:
    node, model = _prepare(cfg, content, context)
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
    }
    for index in range(len(node.label_names)):
        values[protocol.class_count_key("tp", index)] = counts.true_positive[index]
        values[protocol.class_count_key("fp", index)] = counts.false_positive[index]
        values[protocol.class_count_key("fn", index)] = counts.false_negative[index]
    return RecordDict({protocol.METRICS: MetricRecord(values), protocol.ORG: ConfigRecord({"name": node.org})})


def _trainable_names(cfg: FedPrivConfig, context: Context) -> list[str]:
    return trainable_names(cfg.model, local_node(cfg, context).label_names)


def handle_train(cfg: FedPrivConfig, msg: Message, context: Context) -> Message:
    """Train on new-API records, or on the legacy ``fitins`` records of the SecAgg+ workflow."""
    if is_legacy_fit(msg.content):
        names = _trainable_names(cfg, context)
        reply = fit_reply_to_legacy(_train(cfg, legacy_fit_to_content(msg.content, names), context), names)
    else:
        reply = _train(cfg, msg.content, context)
    return Message(reply, reply_to=msg)


def handle_evaluate(cfg: FedPrivConfig, msg: Message, context: Context) -> Message:
    if is_legacy_evaluate(msg.content):
        names = _trainable_names(cfg, context)
        reply = evaluate_reply_to_legacy(_evaluate(cfg, legacy_evaluate_to_content(msg.content, names), context))
    else:
        reply = _evaluate(cfg, msg.content, context)
    return Message(reply, reply_to=msg)


def secagg_when_requested(msg: Message, context: Context, call_next) -> Message:
    """Flower's SecAgg+ client mod, only for messages of the SecAgg+ workflow (one ClientApp for all paths)."""
    if SECAGG_CONFIGS in msg.content.config_records:
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def build_client_app(config: FedPrivConfig | None = None) -> ClientApp:
    """The ClientApp; with ``config`` None it is read from each run's run config."""
    app = ClientApp()

    @app.train(mods=[secagg_when_requested])
    def train(msg: Message, context: Context) -> Message:
        return handle_train(config or config_from_context(context), msg, context)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return handle_evaluate(config or config_from_context(context), msg, context)

    return app


quiet_third_party_warnings()
quiet_flower_debug()
app = build_client_app()
