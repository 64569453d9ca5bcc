"""The coordinator's pre-flight: every node gets ready before round 1 and says how.

A node's first message of a run used to do its one-time work inside round 1:
redact and tokenise its data, build the model template, calibrate its noise.
With ten nodes that work held the first round's SecAgg+ key exchanges back
(BENCHMARKS.md, round overhead), and a node whose data could not be read was
found only when round 1 failed. The pre-flight sends every connected node one
``query`` message before round 1; the node does that work (client/task.py,
``ready_content``; the model template is built by the node's warm run process
meanwhile, fedpriv/runtime/superexec.py) and answers with its data sizes, its privacy plan and what
it has spent. The coordinator prints one line per organisation, as ``fedpriv
simulate`` prints its plan, and records them in ``summary.json``
(``preflight``). Nothing is trained and no privacy is spent; a node that fails
is named with its reason and the rounds go on as before (it fails there too,
or recovers). The budget gate learns only which node is which organisation:
whether a node trains stays its own decision in each round, from its ledger
(a resumed round it already paid for is answered again whatever it has spent).

``strategy.preflight``: ``auto`` (the default) runs it in deployment only: a
simulation plans every organisation itself before its first round
(simulations/runner.py), and asking 10,000 virtual nodes would load them all.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedpriv.kernel import protocol
from fedpriv.kernel.config import FedPrivConfig
from fedpriv.server.budget_gate import BudgetState
from fedpriv.server.prompt_grid import failure_reason

MAX_LINES = 20  # organisations printed one per line; the rest are in summary.json
NODE_WAIT_POLL_S = 0.5


def preflight_wanted(cfg: FedPrivConfig, grid: Grid) -> bool:
    """Whether this run asks its nodes first: ``always``, ``never``, or ``auto`` = not in a simulation."""
    if cfg.strategy.preflight != "auto":
        return cfg.strategy.preflight == "always"
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    return not isinstance(getattr(grid, "grid", grid), InMemoryGrid)  # PromptGrid wraps the run's Grid


def wait_for_nodes(grid: Grid, wanted: int, timeout: float) -> list[int]:
    """The connected node ids, once ``wanted`` are connected or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted or time.monotonic() >= deadline:
            return nodes
        time.sleep(NODE_WAIT_POLL_S)


def ready_row(node_id: int, record: ConfigRecord) -> dict[str, Any]:
    """One organisation's entry of ``summary.json``'s ``preflight.ready`` from its READY record."""
    row: dict[str, Any] = {
        "org": str(record[protocol.READY_ORG]),
        "node_id": node_id,
        "train_examples": int(record[protocol.READY_TRAIN]),
        "test_examples": int(record[protocol.READY_TEST]),
    }
    if protocol.READY_MAX_LENGTH in record:
        row["max_length"] = int(record[protocol.READY_MAX_LENGTH])
    if protocol.READY_NOISE in record:
        row |= {
            "target_epsilon": float(record[protocol.READY_TARGET_EPSILON]),
            "delta": float(record[protocol.READY_DELTA]),
            "noise_multiplier": float(record[protocol.READY_NOISE]),
            "sample_rate": float(record[protocol.READY_SAMPLE_RATE]),
            "planned_steps": int(record[protocol.READY_PLANNED_STEPS]),
            "epsilon": float(record[protocol.READY_EPSILON]),
            "max_epsilon": float(record[protocol.READY_MAX_EPSILON]),
        }
    return row


def describe_row(row: dict[str, Any], width: int) -> str:
    """One organisation's line: its data sizes, its noise plan with DP, what it spent when known.

    The same line ``fedpriv simulate`` prints for each planned organisation (simulations/runner.py)."""
    line = f"  {row['org']:<{width}}  train {row['train_examples']:>6}  test {row['test_examples']:>5}"
    if "noise_multiplier" in row:
        line += (
            f"  target eps {row['target_epsilon']:g} delta {row['delta']:g}  sigma {row['noise_multiplier']:.3f}"
            f"  q {row['sample_rate']:.4f}  steps {row['planned_steps']}"
        )
    if "epsilon" in row:
        line += f"  spent {row['epsilon']:.3f} of max {row['max_epsilon']:g}"
    return line


def run_preflight(
    grid: Grid,
    cfg: FedPrivConfig,
    *,
    node_config: dict[str, Any],
    num_nodes: int,
    budget: BudgetState,
    say: Callable[[str], None],
    elapsed: Callable[[], float],
) -> dict[str, Any]:
    """Ask every connected node to get ready; returns ``summary.json``'s ``preflight`` block."""
    started = time.monotonic()
    timeout = cfg.strategy.round_timeout
    nodes = wait_for_nodes(grid, num_nodes, timeout)
    config = ConfigRecord(dict(node_config))
    messages = [
        Message(RecordDict({protocol.CONFIG: config}), dst_node_id=node_id, message_type=MessageType.QUERY)
        for node_id in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout)) if messages else []
    ready, failed = [], []
    for reply in replies:
        node_id = reply.metadata.src_node_id
        if reply.has_error() or protocol.READY not in reply.content:
            reason = failure_reason(reply) if reply.has_error() else "the reply has no ready record"
            failed.append({"node_id": node_id, "reason": reason})
            continue
        try:
            row = ready_row(node_id, reply.content[protocol.READY])
        except (KeyError, TypeError, ValueError) as exc:  # a node's bug or a hostile node: said, never raised
            failed.append({"node_id": node_id, "reason": f"malformed ready record ({exc.__class__.__name__}: {exc})"})
            continue
        budget.org_of[node_id] = row["org"]  # failure lines in round 1 name the organisation
        ready.append(row)
    answered = {reply.metadata.src_node_id for reply in replies}
    failed += [{"node_id": node_id, "reason": "no reply in time"} for node_id in nodes if node_id not in answered]
    ready.sort(key=lambda row: row["org"])
    wall = time.monotonic() - started
    say(
        f"pre-flight: {len(ready)} of {len(nodes)} connected node(s) ready in {wall:.1f} s"
        f" (the run waits for {num_nodes}); data loaded" + (", noise calibrated" if cfg.privacy.enabled else "")
    )
    width = max((len(row["org"]) for row in ready), default=0)
    for row in ready[:MAX_LINES]:
        say(describe_row(row, width))
    if len(ready) > MAX_LINES:
        say(f"  ... and {len(ready) - MAX_LINES} more (summary.json: preflight)")
    for row in failed[:MAX_LINES]:
        say(f"pre-flight: node {row['node_id']} is not ready: {row['reason']}")
    if len(failed) > MAX_LINES:
        say(f"pre-flight: {len(failed) - MAX_LINES} more node(s) not ready (summary.json: preflight)")
    return {
        "nodes_asked": len(nodes),
        "wall_s": round(wall, 2),
        "elapsed_s": round(elapsed(), 2),  # on the clock of rounds[].elapsed_s: the next round starts here
        "ready": ready,
        "failed": failed,
    }
