"""The node's work for one message: set up its data and model, train with DP, evaluate.

Kept apart from ``client_app.py`` so that a ClientApp process that only runs
a SecAgg+ key-exchange stage never imports torch, transformers or Opacus:
under a SuperNode every message is a fresh process.
"""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Context, MetricRecord, RecordDict

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
from client.stage_timing import phase
from client.training import train_locally
from fedpriv import protocol
from fedpriv.config import FedPrivConfig
from privacy.accountant_state import NodePrivacy
from privacy.calibration import dp_steps_per_epoch
from shared_models.weights import load_trainable, trainable_arrays


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
    node, model = prepare(cfg, content, context)
    server_config = content[protocol.CONFIG]
    server_round = int(server_config[protocol.SERVER_ROUND])
    device = resolve_device(node.device)
    privacy = None
    if cfg.privacy.enabled:
        folder = state_dir(node, str(server_config.get(protocol.RUN_DIR, "")))
        with phase("privacy"):
            # Calibrated once, in the node's first round; later rounds check the settings against the stored plan.
            plan = org_privacy_plan(
                cfg,
                node.org,
                len(node.train),
                target=(node.target_epsilon, node.delta),
                calibrate=not NodePrivacy.has_plan(folder),
            )
            privacy = NodePrivacy.open(folder, plan)
        # The steps this round will really take (the server may ask for more local epochs than planned).
        steps = cfg.training.local_epochs * dp_steps_per_epoch(len(node.train), cfg.training.batch_size)
        with phase("privacy"):
            after = privacy.epsilon_after(steps)
        if after > privacy.plan.target_epsilon:
            # Never spend past the budget, whatever the server asks.
            raise NodeSetupError(
                f"organisation '{node.org}' refuses round {server_round}: epsilon would reach {after:.4f},"
                f" above its target {privacy.plan.target_epsilon} (planned {privacy.plan.planned_rounds} rounds)"
            )
    with phase("train"):
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
    }
    for index in range(len(node.label_names)):
        values[protocol.class_count_key("tp", index)] = counts.true_positive[index]
        values[protocol.class_count_key("fp", index)] = counts.false_positive[index]
        values[protocol.class_count_key("fn", index)] = counts.false_negative[index]
    return RecordDict({protocol.METRICS: MetricRecord(values), protocol.ORG: ConfigRecord({"name": node.org})})


def node_trainable_names(cfg: FedPrivConfig, context: Context) -> list[str]:
    return trainable_names(cfg.model, local_node(cfg, context).label_names)
