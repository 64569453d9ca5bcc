"""The node's privacy budget: whether it may train this round, and the signed record of what it spent.

One object over the organisation's calibrated plan, its Opacus accountant
and its ledger. Before any DP step the node asks ``check(steps)``: if the
steps this round would really take (whatever the server asked for) would
carry its epsilon past ``max_epsilon``, it records a refusal and does not
train. After training it records the round. The ledger is written (and
fsynced) before the accountant file, and on start the accountant adopts the
ledger if it holds more, so the node never counts less than it reported.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord

from fedpriv.client.node import LocalNode
from fedpriv.kernel import protocol
from fedpriv.kernel.config import FedPrivConfig
from fedpriv.privacy.accountant_state import NodePrivacy
from fedpriv.privacy.calibration import dp_steps_per_epoch
from fedpriv.privacy.ledger import SIGNING_KEY_FILE, NodeLedger, ensure_signing_key, public_key_text
from fedpriv.privacy.org_plan import org_privacy_plan


@dataclass(frozen=True)
class Refusal:
    """Why this node will not train this round (recorded in its ledger before the reply)."""

    server_round: int
    requested_steps: int
    epsilon: float
    epsilon_if_trained: float
    max_epsilon: float

    @property
    def reason(self) -> str:
        return (
            f"epsilon would reach {self.epsilon_if_trained:.4f} after {self.requested_steps} more DP steps,"
            f" above the organisation's budget max_epsilon={self.max_epsilon:g} (spent so far {self.epsilon:.4f})"
        )


def round_steps(cfg: FedPrivConfig, num_examples: int) -> int:
    """The DP steps one round as configured takes (what Opacus's Poisson loader will run)."""
    return cfg.training.local_epochs * dp_steps_per_epoch(num_examples, cfg.training.batch_size)


class NodeBudget:
    """An organisation's plan + accountant + ledger, opened from its state folder."""

    def __init__(self, node: LocalNode, privacy: NodePrivacy, ledger: NodeLedger):
        self.node = node
        self.privacy = privacy
        self.ledger = ledger
        self.local_epochs: int | None = None

    @classmethod
    def open(cls, cfg: FedPrivConfig, node: LocalNode, folder: Path, *, calibrate: bool = True) -> NodeBudget:
        """Open (or start) the node's privacy state; the noise is calibrated only when no plan is stored yet."""
        needs_plan = not NodePrivacy.has_plan(folder)
        plan = org_privacy_plan(
            cfg,
            node.org,
            len(node.train),
            (node.target_epsilon, node.delta),  # its own (node.yaml), or the run config's for it in a simulation
            calibrate=calibrate and needs_plan,
        )
        privacy = NodePrivacy.open(folder, plan)
        # the kit's key in deployment (made here if an older kit lacks one); per virtual organisation in simulation
        key = ensure_signing_key(node.ledger_key or Path(folder) / SIGNING_KEY_FILE)
        ledger = NodeLedger.open(folder, node.org, key)
        privacy.catch_up(
            [
                (e["noise_multiplier"], e["sample_rate"], e["local_steps"])
                for e in ledger.entries
                if e["kind"] == "dp_round"
            ]
        )
        budget = cls(node, privacy, ledger)
        budget.local_epochs = cfg.training.local_epochs  # recorded with each round: its steps are this many epochs
        return budget

    def check(self, server_round: int, steps: int) -> Refusal | None:
        """None when ``steps`` more DP steps stay within ``max_epsilon``, else the refusal (not yet recorded)."""
        spent = self.privacy.epsilon()
        after = self.privacy.epsilon_after(steps)
        if after > self.node.max_epsilon:
            return Refusal(server_round, steps, spent, after, self.node.max_epsilon)
        return None

    def record_refusal(self, refusal: Refusal) -> dict:
        plan = self.privacy.plan
        return self.ledger.append(
            "refusal",
            refusal.server_round,
            {
                "reason": refusal.reason,
                "requested_steps": refusal.requested_steps,
                "epsilon": refusal.epsilon,
                "epsilon_if_trained": refusal.epsilon_if_trained,
                "max_epsilon": refusal.max_epsilon,
                "delta": plan.delta,
                "accountant": plan.accountant,
            },
        )

    def record_round(
        self, server_round: int, steps_before: int, model_digest: str, redaction: dict, stopped: str | None = None
    ) -> dict:
        """Ledger entry for the steps taken since ``steps_before`` (fsynced), then the accountant file.

        ``redaction`` (the node's rule set and counts) is recorded with it: the data these steps saw.
        ``stopped="diverged"``: the round stopped before its last step (a non-finite loss); said in the entry.
        """
        plan = self.privacy.plan
        taken = self.privacy.steps - steps_before
        for sigma, q, _ in self.privacy.accountant.history:
            if sigma != plan.noise_multiplier or q != plan.sample_rate:
                raise RuntimeError(f"accountant holds a step at sigma={sigma}, q={q}, not the plan's")
        entry = self.ledger.append(
            "dp_round",
            server_round,
            {
                "local_steps": taken,
                "sample_rate": plan.sample_rate,
                "noise_multiplier": plan.noise_multiplier,
                "max_grad_norm": plan.max_grad_norm,
                "delta": plan.delta,
                "accountant": plan.accountant,
                "epsilon": self.privacy.epsilon(),
                "num_examples": len(self.node.train),
                "model_digest": model_digest,
                "target_epsilon": plan.target_epsilon,
                "max_epsilon": self.node.max_epsilon,
                "redaction": redaction,
                **({"local_epochs": self.local_epochs} if self.local_epochs is not None else {}),
                **({"stopped": stopped} if stopped else {}),
            },
        )
        self.privacy.save()
        return entry

    def report(self, cfg: FedPrivConfig, coordinator_heads: str | None) -> ConfigRecord:
        """The LEDGER record for a reply: entries the coordinator lacks, and whether another round fits."""
        have = 0
        if coordinator_heads:
            try:
                have = int(json.loads(coordinator_heads).get(self.node.org, 0))
            except (ValueError, TypeError, AttributeError):
                have = 0
        steps = round_steps(cfg, len(self.node.train))
        after = self.privacy.epsilon_after(steps)
        return ConfigRecord(
            {
                protocol.LEDGER_ORG: self.node.org,
                protocol.LEDGER_PUBLIC_KEY: public_key_text(self.ledger.key.public_key()),
                protocol.LEDGER_ENTRIES: json.dumps(self.ledger.since(have), sort_keys=True),
                protocol.LEDGER_EPSILON: self.privacy.epsilon(),
                protocol.LEDGER_EPSILON_NEXT: after if math.isfinite(after) else 1e308,
                protocol.LEDGER_MAX_EPSILON: self.node.max_epsilon,
                protocol.LEDGER_CAN_TRAIN: bool(after <= self.node.max_epsilon),
            }
        )
