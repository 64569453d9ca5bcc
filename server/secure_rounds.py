"""Rounds with secure aggregation: Flower's SecAgg+ workflow around a legacy Flower strategy.

Flower 1.41 offers SecAgg+ only through its legacy ``DefaultWorkflow``. This
module keeps everything else as on the plain path: the same ClientApp (it
speaks the legacy records too), the same ``RoundTracker`` (fed through small
shims), the same round order (train, federated evaluate, end of round). A round
that SecAgg+ abandons (too many dropouts) leaves the global model unchanged
and Flower says nothing: it is detected here and reported as a round in which
no organisation trained.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.common import ndarrays_to_parameters
from flwr.serverapp import Grid

from fedpriv.kernel import protocol
from fedpriv.kernel.config import FedPrivConfig
from fedpriv.kernel.errors import ConfigError
from fedpriv.kernel.legacy_messages import (
    Layout,
    flat_vector,
    legacy_evaluate_metrics_to_content,
    legacy_fit_metrics_to_content,
    split_vector,
)
from fedpriv.server.budget_gate import BudgetState, TrainingDiverged, diverged_entry, gate_legacy_strategy
from fedpriv.server.prompt_grid import PromptGrid, failure_reason
from fedpriv.server.round_tracker import RoundTracker
from fedpriv.server.strategy import select_strategy

# client/node.py's TrainingDivergedError, as failure_reason() gives it
_DIVERGED = re.compile(r"^TrainingDivergedError: organisation '([^']+)': (.+)$")
MAX_FAILURES_SAID = 10  # per round and exchange: the nodes whose failure is printed with its reason


class FailureReports:
    """``PromptGrid.on_failure`` on the SecAgg+ path: a line per failing node with its own reason, at most
    ``MAX_FAILURES_SAID`` per round and exchange (then one line that more failed)."""

    def __init__(
        self, say: Callable[[str], None], num_rounds: int, org_of: dict[int, str], current_round: Callable[[], int]
    ) -> None:
        self.say, self.num_rounds, self.org_of, self.current_round = say, num_rounds, org_of, current_round
        self.counts: dict[tuple[int, str], int] = {}
        self.budget: BudgetState | None = None  # set by run_secure_rounds: where diverged nodes are recorded

    def _note_divergence(self, server_round: int, reply) -> None:
        """A node whose training stopped being finite drops out of a SecAgg+ round with TrainingDivergedError."""
        found = _DIVERGED.match(failure_reason(reply))
        if found is not None and self.budget is not None:
            org, why = found.group(1), found.group(2)
            self.org_of.setdefault(reply.metadata.src_node_id, org)
            self.budget.diverged.append(diverged_entry(server_round, org, why))

    def __call__(self, kind: str, reply) -> None:
        server_round = self.current_round()
        self._note_divergence(server_round, reply)
        count = self.counts[server_round, kind] = self.counts.get((server_round, kind), 0) + 1
        where = f"[round {server_round}/{self.num_rounds}]"
        if count > MAX_FAILURES_SAID:  # a federation of many nodes failing alike: the first ones say why
            if count == MAX_FAILURES_SAID + 1:
                self.say(f"{where}  more nodes failed in {kind}: their own logs say why")
            return
        node_id = reply.metadata.src_node_id
        org = self.org_of.get(node_id)  # known once the node reported its ledger
        self.say(f"{where}  node {node_id}{f' ({org})' if org else ''} failed in {kind}: {failure_reason(reply)}")


def secagg_shares(cfg: FedPrivConfig, num_nodes: int) -> tuple[int, int]:
    """(num_shares, reconstruction_threshold): by default every node, and two thirds of them (fewer than all)."""
    secagg = cfg.secure_aggregation
    shares = secagg.num_shares or num_nodes
    if shares < 3:
        raise ConfigError(
            f"config: secure_aggregation: SecAgg+ needs at least 3 organisations (num_shares > 2), got {shares}"
        )
    threshold = secagg.reconstruction_threshold or max(2, math.ceil(2 * shares / 3))
    return shares, min(threshold, shares - 1)


def _legacy_strategy(
    cfg: FedPrivConfig, tracker: RoundTracker, initial: list, num_nodes: int, fit_config: dict, budget: BudgetState
):
    from flwr.server.strategy import FedAdam, FedAvg, FedProx

    def fit_metrics(results: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
        contents = [legacy_fit_metrics_to_content(metrics) for _, metrics in results]
        return dict(tracker.aggregate_train(contents, protocol.NUM_EXAMPLES))

    def evaluate_metrics(results: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
        contents = [legacy_evaluate_metrics_to_content(metrics) for _, metrics in results]
        return dict(tracker.aggregate_evaluate(contents, protocol.NUM_EXAMPLES))

    strat = cfg.strategy
    common = dict(
        fraction_fit=strat.fraction_train,
        fraction_evaluate=strat.fraction_evaluate,
        min_fit_clients=min(strat.min_train_nodes, num_nodes),
        min_evaluate_clients=min(strat.min_evaluate_nodes, num_nodes),
        min_available_clients=num_nodes,
        initial_parameters=ndarrays_to_parameters(initial),
        on_fit_config_fn=lambda rnd: {**fit_config, protocol.SERVER_ROUND: rnd, protocol.LEDGER_HEADS: budget.heads()},
        on_evaluate_config_fn=lambda rnd: {
            **fit_config,
            protocol.SERVER_ROUND: rnd,
            protocol.LEDGER_HEADS: budget.heads(),
        },
        fit_metrics_aggregation_fn=fit_metrics,
        evaluate_metrics_aggregation_fn=evaluate_metrics,
        accept_failures=True,
    )
    _, threshold = secagg_shares(cfg, num_nodes)
    return gate_legacy_strategy(select_strategy(strat, FedAvg, FedProx, FedAdam, **common), budget, threshold)


def _named(legacy: ArrayRecord, layout: Layout, dtypes: dict[str, Any]) -> ArrayRecord:
    """The legacy (one flat vector, float64 after SecAgg+) parameters as our named trainable tensors."""
    tensors = split_vector([array.numpy() for array in legacy.values()], layout)
    return ArrayRecord(
        array_dict={name: Array(t.astype(dtypes[name])) for (name, _), t in zip(layout, tensors, strict=True)}
    )


def run_secure_rounds(
    grid: Grid,
    context: Context,
    *,
    cfg: FedPrivConfig,
    tracker: RoundTracker,
    initial: ArrayRecord,
    fit_config: dict[str, Any],
    num_nodes: int,
    budget: BudgetState,
    say: Callable[[str], None] = print,
    round_offset: int = 0,
    adopt_strategy: Callable[[Any], None] | None = None,
) -> ArrayRecord:
    """Run every round with SecAgg+ (those after ``round_offset`` when resuming); returns the final global weights.

    ``adopt_strategy`` receives the legacy strategy before round 1 (to restore or save its state).
    """
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
    from flwr.server.workflow.default_workflows import default_evaluate_workflow

    tensors = {name: array.numpy() for name, array in initial.items()}
    layout = [(name, tuple(t.shape)) for name, t in tensors.items()]
    dtypes = {name: t.dtype for name, t in tensors.items()}
    vector_dtype = flat_vector(list(tensors.values())).dtype
    strategy = _legacy_strategy(cfg, tracker, [flat_vector(list(tensors.values()))], num_nodes, fit_config, budget)
    if adopt_strategy is not None:
        adopt_strategy(strategy)
    legacy = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=cfg.training.rounds - round_offset, round_timeout=cfg.strategy.round_timeout),
        strategy=strategy,
    )
    shares, threshold = secagg_shares(cfg, num_nodes)
    secagg = SecAggPlusWorkflow(
        num_shares=shares,
        reconstruction_threshold=threshold,
        clipping_range=cfg.secure_aggregation.clipping_range,
        quantization_range=cfg.secure_aggregation.quantization_range,
        max_weight=cfg.secure_aggregation.max_weight,
        timeout=cfg.strategy.round_timeout,
    )

    def current_round(ctx: Context) -> int:
        return int(ctx.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])

    if isinstance(grid, PromptGrid):  # Flower's SecAgg+ and evaluate workflows drop error replies silently
        grid.on_failure = FailureReports(say, cfg.training.rounds, budget.org_of, lambda: current_round(legacy))
        grid.on_failure.budget = budget

    def fit(grid_: Grid, ctx: Context) -> None:
        # Flower's loop counts 1..(rounds left); a resumed run continues after round_offset (set here, once per
        # round: SecAgg+, the strategy's configure_fit and the evaluation all read this value)
        ctx.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND] = current_round(ctx) + round_offset
        before = ctx.state.array_records[MAIN_PARAMS_RECORD]
        secagg(grid_, ctx)
        if ctx.state.array_records[MAIN_PARAMS_RECORD] is before:
            say(
                f"[round {current_round(ctx)}/{cfg.training.rounds}]  secure aggregation halted: fewer than"
                f" {threshold} organisations answered; this round did not change the model. Organisations that"
                " trained in it still spent privacy: their own accountants hold it, this summary cannot"
            )
        elif not aggregate_is_finite(ctx.state.array_records[MAIN_PARAMS_RECORD]):
            ctx.state.array_records[MAIN_PARAMS_RECORD] = before
            say(
                f"[round {current_round(ctx)}/{cfg.training.rounds}]  the unmasked aggregate has values that are"
                " not finite: the model is left unchanged (SecAgg+ hides which node's update caused it)"
            )
        else:
            ctx.state.array_records[MAIN_PARAMS_RECORD] = _as_dtype(
                ctx.state.array_records[MAIN_PARAMS_RECORD], vector_dtype
            )

    def evaluate_then_close(grid_: Grid, ctx: Context) -> None:
        default_evaluate_workflow(grid_, ctx)  # its replies bring a diverged node's ledger entry
        tracker.end_of_round(current_round(ctx), _named(ctx.state.array_records[MAIN_PARAMS_RECORD], layout, dtypes))
        stopped = budget.diverged_reason(current_round(ctx))
        if stopped is not None:  # the round ran with the others; the next would diverge again
            raise TrainingDiverged(stopped)

    tracker.end_of_round(0, initial)
    DefaultWorkflow(fit_workflow=fit, evaluate_workflow=evaluate_then_close)(grid, legacy)
    return _named(legacy.state.array_records[MAIN_PARAMS_RECORD], layout, dtypes)


def _as_dtype(record: ArrayRecord, dtype) -> ArrayRecord:
    """The aggregate in the model's dtype (SecAgg+ hands back float64).

    The nodes load it into parameters of that dtype anyway; sending it so halves the download, and makes the
    global model a node receives bit-identical to the checkpoint a resumed run starts from (same digest).
    """
    return ArrayRecord(array_dict={key: Array(np.asarray(array.numpy(), dtype=dtype)) for key, array in record.items()})


def aggregate_is_finite(record) -> bool:
    """Whether every value of an aggregate (an ArrayRecord) is finite: all SecAgg+ lets the coordinator check."""
    return all(np.isfinite(array.numpy()).all() for array in record.values())
