"""The coordinator's side of budget enforcement: collect ledgers, leave out nodes that cannot train, stop.

Nodes decide; the coordinator listens. Every reply may carry the node's new
ledger entries (kept by :class:`LedgerStore`) and its outlook: whether one
more round fits its ``max_epsilon``. A node that refused, or said it cannot
afford another round, gets no more train messages (it still evaluates). When
no node can train any more, the run ends early with the reason, instead of
sending rounds that every node would refuse.

``BudgetGatedStrategy`` wraps any Message-API strategy (FedAvg, FedProx,
FedAdam); ``gate_legacy_strategy`` does the same to the legacy strategy that
SecAgg+ drives.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedpriv.kernel import protocol
from fedpriv.server.ledger_store import LedgerStore
from fedpriv.server.prompt_grid import failure_reason
from fedpriv.server.update_checks import Rejection, update_problem


class BudgetExhausted(Exception):
    """No node can train another round within its budget: the run ends here."""


class TrainingDiverged(Exception):
    """A node's local training stopped being finite (loss or update): the run ends with this round.

    Every later round would start from the same global model and settings, so it would diverge again and
    spend privacy for nothing. ``str(exc)``: one line naming the round and the organisation.
    """


def diverged_entry(server_round: int, org: str, reason: str, step: int = 0, kind: str = "") -> dict[str, Any]:
    """summary.json's record of one organisation whose training diverged; step and kind read from the reason
    when not given (a SecAgg+ node can only say it in its error text)."""
    reason = " ".join(reason.split())
    if not step:
        found = re.search(r" at step (\d+)", reason)
        step = int(found.group(1)) if found else 0
    if not kind:
        found = re.search(r"non-finite \((nan|inf)\)", reason)
        kind = found.group(1) if found else "overflow" if "overflowed" in reason else "update"
    return {"round": server_round, "org": org, "step": step, "kind": kind, "reason": reason}


@dataclass
class BudgetState:
    """What the coordinator knows of each node's budget, from the nodes' own reports."""

    ledgers: LedgerStore
    say: Callable[[str], None] = print
    org_of: dict[int, str] = field(default_factory=dict)
    outlook: dict[str, dict[str, Any]] = field(default_factory=dict)  # org -> last LEDGER record's numbers
    refusals: list[dict[str, Any]] = field(default_factory=list)
    stopped_reason: str | None = None
    diverged: list[dict[str, Any]] = field(default_factory=list)  # nodes whose training stopped being finite
    diverged_privacy: list[Any] = field(default_factory=list)  # their privacy reports (what they spent)

    def heads(self) -> str:
        return self.ledgers.heads_json()

    def note(self, node_id: int, content, server_round: int) -> None:
        """Take a reply's LEDGER record (entries + outlook) and REFUSAL record, if any."""
        if protocol.LEDGER in content:
            record = content[protocol.LEDGER]
            org = str(record.get(protocol.LEDGER_ORG, ""))
            self.ledgers.ingest(record, source=f"node {node_id} ({org or 'unnamed'})")
            if org:
                self.org_of[node_id] = org
                self.outlook[org] = {
                    "epsilon": float(record.get(protocol.LEDGER_EPSILON, 0.0)),
                    "epsilon_next": float(record.get(protocol.LEDGER_EPSILON_NEXT, 0.0)),
                    "max_epsilon": float(record.get(protocol.LEDGER_MAX_EPSILON, 0.0)),
                    "can_train": bool(record.get(protocol.LEDGER_CAN_TRAIN, True)),
                }
        if protocol.REFUSAL in content:
            refusal = dict(content[protocol.REFUSAL])
            org = str(refusal.get("org", ""))
            self.org_of.setdefault(node_id, org)
            self.outlook.setdefault(org, {})["can_train"] = False
            self.refusals.append({"round": server_round, "org": org, "reason": str(refusal.get("reason", ""))})
            self.say(f"[round {server_round}]  {org} refused to train: {refusal.get('reason', '')}")
        if protocol.DIVERGED in content:
            record = dict(content[protocol.DIVERGED])
            org = str(record.get("org", "")) or self.org_of.get(node_id, f"node {node_id}")
            self.org_of.setdefault(node_id, org)
            reason, step, kind = str(record.get("reason", "")), int(record.get("step", 0)), str(record.get("kind", ""))
            entry = diverged_entry(server_round, org, reason, step, kind)
            self.diverged.append(entry)
            if protocol.PRIVACY in content:
                self.diverged_privacy.append(content[protocol.PRIVACY])
            self.say(f"[round {server_round}]  {org}: {entry['reason']}; nothing it trained was sent")

    def diverged_reason(self, server_round: int) -> str | None:
        """One line naming the round and each organisation whose training diverged in it; None if none did."""
        parts = [f"{d['org']}: {d['reason']}" for d in self.diverged if d["round"] == server_round]
        return f"round {server_round}, " + "; ".join(parts) if parts else None

    def can_train(self, node_id: int) -> bool:
        org = self.org_of.get(node_id)
        return org is None or self.outlook.get(org, {}).get("can_train", True)

    def exhausted_reason(self) -> str:
        parts = []
        for org, view in sorted(self.outlook.items()):
            if "epsilon" in view:
                parts.append(
                    f"{org} spent {view['epsilon']:.3f} of max_epsilon {view['max_epsilon']:g},"
                    f" one more round would reach {view['epsilon_next']:.3f}"
                )
            else:
                parts.append(f"{org} refused")
        return "no organisation can train another round within its budget: " + "; ".join(parts)

    def select(self, node_ids: Iterable[int], server_round: int, minimum: int = 1) -> set[int]:
        """The node ids that may train; raises BudgetExhausted when fewer than ``minimum`` may."""
        node_ids = list(node_ids)
        allowed = {node_id for node_id in node_ids if self.can_train(node_id)}
        left_out = sorted(self.org_of[n] for n in node_ids if n not in allowed)
        if left_out:
            self.say(f"[round {server_round}]  left out (budget spent): {', '.join(left_out)}")
        if node_ids and len(allowed) < minimum:
            reason = self.exhausted_reason()
            if allowed:  # SecAgg+ cannot run a round with fewer nodes than its threshold
                reason = (
                    f"only {len(allowed)} organisation(s) can train another round, secure aggregation needs"
                    f" {minimum}: " + reason.split(": ", 1)[1]
                )
            self.stopped_reason = reason
            raise BudgetExhausted(reason)
        return allowed


def stop_waiting_for_everyone(strategy) -> None:
    """After the first round is configured, sample from the nodes that are there.

    Flower's strategies wait for ``min_available_nodes`` (every organisation, so that round 1 starts with all)
    before *every* round; once one node has died that wait would never end. From round 1's own messages on,
    the minimum becomes the strategy's minimum of training nodes. Walks wrappers (``.strategy``) too.
    """
    while strategy is not None:
        if hasattr(strategy, "min_available_nodes") and hasattr(strategy, "min_train_nodes"):
            strategy.min_available_nodes = min(strategy.min_available_nodes, strategy.min_train_nodes)
        if hasattr(strategy, "min_available_clients") and hasattr(strategy, "min_fit_clients"):
            strategy.min_available_clients = min(strategy.min_available_clients, strategy.min_fit_clients)
        strategy = getattr(strategy, "strategy", None)


def _with_heads(config: ConfigRecord, state: BudgetState) -> ConfigRecord:
    return ConfigRecord({**dict(config), protocol.LEDGER_HEADS: state.heads()})


class BudgetGatedStrategy(Strategy):
    """A Flower Message-API strategy with the budget gate and the update checks in front of it.

    Every reply's ledger entries are taken first (a node that trained spent privacy, whatever happens to its
    update); refusals and updates that fail ``fedpriv.server.update_checks`` are left out of the aggregate.

    With ``client_dp`` (a :class:`fedpriv.server.client_dp.ClientDPAccount`, ``inner`` being its ``OrganisationDP``) the
    coordinator's own organisation-level budget is checked before each round and each release is recorded.
    With ``round_offset`` (a resumed run) the rounds Flower counts are shifted before anything sees them.
    """

    def __init__(
        self,
        inner: Strategy,
        state: BudgetState,
        client_dp=None,
        max_update_norm: float | None = None,
        round_offset: int = 0,
        rejections: Iterable[Rejection] = (),
    ):
        self.inner = inner
        self.state = state
        self.client_dp = client_dp
        self.max_update_norm = max_update_norm
        # a resumed run: Flower's ``start`` counts its rounds from 1, the run continues after ``round_offset``
        self.round_offset = round_offset
        self.global_arrays: ArrayRecord | None = None  # what this round's train messages carried
        self.rejections: list[Rejection] = list(rejections)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        if self.client_dp is not None:
            reason = self.client_dp.refusal_reason()
            if reason is not None:
                self.state.stopped_reason = reason
                raise BudgetExhausted(reason)
        self.global_arrays = arrays
        messages = list(self.inner.configure_train(server_round, arrays, _with_heads(config, self.state), grid))
        stop_waiting_for_everyone(self.inner)
        allowed = self.state.select([m.metadata.dst_node_id for m in messages], server_round)
        return [m for m in messages if m.metadata.dst_node_id in allowed]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        trained = []
        for reply in replies:
            if reply.has_error():
                trained.append(reply)  # the inner strategy counts and logs failures
                continue
            self.state.note(reply.metadata.src_node_id, reply.content, server_round)  # its privacy spent, first
            if protocol.REFUSAL in reply.content or protocol.DIVERGED in reply.content:
                continue
            problem = None
            if self.global_arrays is not None:
                problem = update_problem(reply.content, self.global_arrays, self.max_update_norm)
            if problem is None:
                trained.append(reply)
                continue
            node_id = reply.metadata.src_node_id
            rejection = Rejection(server_round, node_id, self.state.org_of.get(node_id), problem)
            self.rejections.append(rejection)
            self.state.say(
                f"[round {server_round}]  update from {rejection.org or 'an unnamed organisation'} (node {node_id})"
                f" rejected: {problem}; the round aggregates the others"
            )
        diverged = self.state.diverged_reason(server_round)
        if diverged is not None:  # the others' updates are not aggregated: the round did not complete
            raise TrainingDiverged(diverged)
        answered = sum(not reply.has_error() for reply in trained)
        if not answered:
            for reply in trained:  # the inner strategy, which logs failures, is not called: say them here
                node_id = reply.metadata.src_node_id
                self.state.say(
                    f"[round {server_round}]  {self.state.org_of.get(node_id) or 'node ' + str(node_id)} did not"
                    f" train: {failure_reason(reply)}"
                )
            return None, None  # nobody trained: the global model stays as it is
        arrays, metrics = self.inner.aggregate_train(server_round, trained)
        if arrays is not None and self.global_arrays is not None:
            arrays = in_dtypes_of(arrays, self.global_arrays)
        if self.client_dp is not None and arrays is not None:
            release = (
                self.inner
            )  # fedpriv.server.client_dp.OrganisationDP: what its last release summed, and clipped to
            self.client_dp.record(
                server_round, release.released_organisations, arrays, float(release.released_clipping_norm)
            )
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        return self.inner.configure_evaluate(server_round, arrays, _with_heads(config, self.state), grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        replies = list(replies)
        for reply in replies:
            if not reply.has_error():
                self.state.note(reply.metadata.src_node_id, reply.content, server_round)
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()


def in_dtypes_of(arrays: ArrayRecord, like: ArrayRecord) -> ArrayRecord:
    """``arrays`` in the dtypes of ``like`` (the model's own): FedAdam and the DP wrappers hand back float64.

    Nodes load the global model into parameters of the model's dtype anyway, so nothing they train on changes;
    keeping it so makes every round's updates comparable with the global model (server/update_checks.py checks
    dtypes), the checkpoint a resumed run starts from bit-identical to what the nodes received, and the
    download half the size.
    """
    if all(arrays[name].dtype == like[name].dtype for name in arrays if name in like):
        return arrays
    return ArrayRecord(
        array_dict={
            name: Array(np.asarray(array.numpy(), dtype=np.dtype(like[name].dtype))) if name in like else array
            for name, array in arrays.items()
        }
    )


def gate_legacy_strategy(strategy, state: BudgetState, minimum: int = 1):
    """The same gate on a legacy strategy (the SecAgg+ path): filter ``configure_fit``, read fit/evaluate results."""
    from fedpriv.kernel.legacy_messages import legacy_evaluate_metrics_to_content, legacy_fit_metrics_to_content

    configure_fit, aggregate_fit = strategy.configure_fit, strategy.aggregate_fit
    aggregate_evaluate = strategy.aggregate_evaluate

    def gated_configure_fit(server_round, parameters, client_manager):
        pairs = configure_fit(server_round, parameters, client_manager)
        stop_waiting_for_everyone(strategy)
        allowed = state.select([int(proxy.node_id) for proxy, _ in pairs], server_round, minimum)
        return [(proxy, ins) for proxy, ins in pairs if int(proxy.node_id) in allowed]

    def noted_aggregate_fit(server_round, results, failures):
        for proxy, res in results:
            state.note(int(proxy.node_id), legacy_fit_metrics_to_content(dict(res.metrics)), server_round)
        return aggregate_fit(server_round, results, failures)

    def noted_aggregate_evaluate(server_round, results, failures):
        for proxy, res in results:
            state.note(int(proxy.node_id), legacy_evaluate_metrics_to_content(dict(res.metrics)), server_round)
        return aggregate_evaluate(server_round, results, failures)

    strategy.configure_fit = gated_configure_fit
    strategy.aggregate_fit = noted_aggregate_fit
    strategy.aggregate_evaluate = noted_aggregate_evaluate
    return strategy
