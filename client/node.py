"""Who this node is: its organisation, its tokenised local data and where its state lives.

In simulation the node is one partition of a shared corpus (``partition-id`` in
``node_config``); the result is cached per process, so data is read and
tokenised once, not every round.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import Context

from client.tokenized import TokenizedTexts, tokenize
from fedpriv import protocol
from fedpriv.config import FedPrivConfig, ModelConfig
from privacy.calibration import PrivacyPlan, plan_privacy
from shared_models.builder import build_model, build_tokenizer
from shared_models.weights import base_model_digest
from simulations.partitioning import plan_partitions


class NodeSetupError(RuntimeError):
    """The node cannot take part as configured (reported to the server as an error reply)."""


@dataclass(frozen=True)
class LocalNode:
    org: str
    label_names: list[str]
    train: TokenizedTexts
    test: TokenizedTexts
    pad_token_id: int


_NODES: dict[tuple[str, int], LocalNode] = {}
_TEMPLATES: dict[str, tuple[torch.nn.Module, str]] = {}


def _simulated_node(cfg: FedPrivConfig, partition_id: int) -> LocalNode:
    key = (cfg.to_json(), partition_id)
    if key not in _NODES:
        _NODES.clear()  # one run at a time per process
        _NODES[key] = _load_partition(cfg, partition_id)
    return _NODES[key]


def _load_partition(cfg: FedPrivConfig, partition_id: int) -> LocalNode:
    plan = plan_partitions(cfg)
    org = plan.org(partition_id)
    tokenizer = build_tokenizer(cfg.model.name)
    max_length = cfg.data.max_length
    return LocalNode(
        org=org.name,
        label_names=list(plan.label_names),
        train=tokenize(org.train.texts, org.train.labels, tokenizer, max_length),
        test=tokenize(org.test.texts, org.test.labels, tokenizer, max_length),
        pad_token_id=tokenizer.pad_token_id,
    )


def local_node(cfg: FedPrivConfig, context: Context) -> LocalNode:
    node_config = context.node_config
    if protocol.NODE_PARTITION_ID not in node_config:
        raise NodeSetupError(
            "node_config: expected 'partition-id' (set by the simulation engine); "
            "deployment nodes are configured by their organisation kit"
        )
    return _simulated_node(cfg, int(node_config[protocol.NODE_PARTITION_ID]))


def state_dir(context: Context, run_dir: str, org: str) -> Path:
    """The node's own state folder (accountant, privacy plan); never shared with the server."""
    configured = context.node_config.get(protocol.NODE_STATE_DIR)
    path = Path(str(configured)) if configured else Path(run_dir) / "nodes" / org
    path.mkdir(parents=True, exist_ok=True)
    return path


def org_privacy_plan(cfg: FedPrivConfig, org: str, num_train: int) -> PrivacyPlan:
    """One organisation's DP plan from config; the same call on the node and in the pre-flight check."""
    target_epsilon, delta = cfg.privacy.target_for(org)
    return plan_privacy(
        org=org,
        num_examples=num_train,
        batch_size=cfg.training.batch_size,
        local_epochs=cfg.training.local_epochs,
        rounds=cfg.training.rounds,
        target_epsilon=target_epsilon,
        delta=delta,
        max_grad_norm=cfg.privacy.max_grad_norm,
        accountant=cfg.privacy.accountant,
    )


def fresh_model(model_cfg: ModelConfig, label_names: list[str]) -> tuple[torch.nn.Module, str]:
    """A private copy of the shared model (built once per process) and its base digest."""
    key = json.dumps([dataclasses.asdict(model_cfg), label_names])
    if key not in _TEMPLATES:
        _TEMPLATES.clear()
        model = build_model(model_cfg, label_names)
        _TEMPLATES[key] = (model, base_model_digest(model))
    template, digest = _TEMPLATES[key]
    return copy.deepcopy(template), digest
