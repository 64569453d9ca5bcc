"""The coordinator's Flower ServerApp: runs the rounds with a Flower strategy and writes the run files.

``fedpriv simulate`` builds it with the resolved config and run folder
(``build_server_app(cfg, run_dir)``); under ``flwr run`` the module-level
``app`` reads ``config``/``overrides`` from the run config.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from pathlib import Path

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedpriv import protocol
from fedpriv.config import FedPrivConfig
from fedpriv.errors import ConfigError
from fedpriv.run_config import config_from_context
from server.budget_gate import BudgetExhausted, BudgetGatedStrategy, BudgetState
from server.checkpoints import save_checkpoint
from server.ledger_store import LedgerStore
from server.prompt_grid import PromptGrid
from server.reports import SUMMARY_FILE, build_summary, write_metrics_csv, write_plot, write_summary
from server.round_tracker import RoundTracker
from server.secure_rounds import run_secure_rounds, secagg_shares
from server.strategy import build_strategy
from shared_models.builder import build_model, build_tokenizer
from shared_models.export import export_model
from shared_models.weights import base_model_digest, count_trainable, load_trainable, trainable_arrays

log = logging.getLogger("fedpriv.server")


def new_run_dir(base: str | Path = "runs") -> Path:
    """A fresh ``runs/<timestamp>/`` folder (suffixed if two runs start in the same second)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(base) / stamp
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path(base) / f"{stamp}-{suffix}"
    path.mkdir(parents=True)
    return path.resolve()


def run_dir_for(cfg: FedPrivConfig) -> Path:
    """``run.out_dir`` itself when set (refused if a run already wrote there), else a fresh ``runs/<timestamp>/``."""
    if not cfg.run.out_dir:
        return new_run_dir("runs")
    path = Path(cfg.run.out_dir).resolve()
    if path.is_file() or (path / SUMMARY_FILE).exists():
        raise ConfigError(
            f"run.out_dir {path}: already holds a run (or is a file); choose a new run folder"
            " (a run's files are never overwritten by another run)"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


def label_names(cfg: FedPrivConfig) -> list[str]:
    """Class names: fixed by the config (always so in deployment), or read from the data the simulation partitions."""
    if cfg.data.labels.names:
        return list(cfg.data.labels.names)
    from simulations.partitioning import plan_partitions  # simulation only: a deployment run names its classes

    return list(plan_partitions(cfg).label_names)


def run_federation(grid: Grid, context: Context, cfg: FedPrivConfig, run_dir: Path, num_nodes: int) -> dict:
    """Run all rounds; returns the summary (also written to ``run_dir/summary.json``)."""
    started = time.monotonic()
    labels = label_names(cfg)
    model = build_model(cfg.model, labels)
    trainable, total = count_trainable(model)
    initial = trainable_arrays(model)
    keep = cfg.output.keep_checkpoints
    latest = {"arrays": initial}
    strategy_holder: list[BudgetGatedStrategy] = []

    def round_end(server_round: int, arrays) -> None:
        latest["arrays"] = arrays
        if strategy_holder:
            extra["rejected_updates"] = [r.to_dict() for r in strategy_holder[0].rejections]
        if strategy_holder and strategy_holder[0].client_dp is not None:
            extra["client_dp"] = strategy_holder[0].client_dp.summary()
        _after_round(run_dir, server_round, arrays, keep, tracker, cfg, extra)

    tracker = RoundTracker(
        num_rounds=cfg.training.rounds,
        num_labels=len(labels),
        dp_enabled=cfg.privacy.enabled,
        on_round_end=round_end,
    )
    budget = BudgetState(LedgerStore(run_dir, warn=tracker.printer), say=tracker.printer)
    extra = {
        "run_dir": str(run_dir),
        "label_names": labels,
        "model": {
            "name": cfg.model.name,
            "finetuning": cfg.model.finetuning,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "upload_bytes_per_round": initial.count_bytes(),
        },
        "status": "running",
        "rejected_updates": [],  # plain path: updates that failed server/update_checks.py (SecAgg+: none can be)
    }
    digest = base_model_digest(model)
    if not cfg.privacy.enabled:
        tracker.printer("DP is OFF: this run gives NO differential privacy guarantee (baseline only).")
    if cfg.secure_aggregation.enabled:
        shares, threshold = secagg_shares(cfg, num_nodes)
        tracker.printer(f"secure aggregation (SecAgg+): {shares} shares, rounds need {threshold} organisations")
        extra["secure_aggregation"] = {"num_shares": shares, "reconstruction_threshold": threshold}
    node_config = {protocol.RUN_DIR: str(run_dir), protocol.BASE_DIGEST: digest}
    try:
        if cfg.secure_aggregation.enabled:
            final = run_secure_rounds(
                grid,
                context,
                cfg=cfg,
                tracker=tracker,
                initial=initial,
                fit_config=node_config,
                num_nodes=num_nodes,
                budget=budget,
                say=tracker.printer,
            )
        else:
            strategy = _plain_strategy(cfg, tracker, num_nodes, budget, run_dir, extra)
            strategy_holder.append(strategy)
            final = strategy.start(
                grid=grid,
                initial_arrays=initial,
                num_rounds=cfg.training.rounds,
                timeout=cfg.strategy.round_timeout,
                train_config=ConfigRecord(node_config),
                evaluate_config=ConfigRecord(node_config),
                evaluate_fn=tracker.end_of_round,
            ).arrays
    except BudgetExhausted as exc:
        tracker.printer(f"run ended after round {len(tracker.rounds)} of {cfg.training.rounds}: {exc}")
        final = latest["arrays"]
    trained = [record for record in tracker.rounds if record.trained_orgs]
    if strategy_holder:
        extra["rejected_updates"] = [r.to_dict() for r in strategy_holder[0].rejections]
    if strategy_holder and strategy_holder[0].client_dp is not None:
        extra["client_dp"] = strategy_holder[0].client_dp.summary()
    if budget.stopped_reason:
        extra["status"] = "budget_exhausted"
    else:
        extra["status"] = "completed" if len(trained) == cfg.training.rounds else "incomplete"
    extra["budget"] = {
        "stopped_reason": budget.stopped_reason,
        "refusals": budget.refusals,
        "ledgers": {org: dict(head) for org, head in sorted(budget.ledgers.heads.items())},
    }
    extra["rounds_without_training"] = [record.round for record in tracker.rounds if not record.trained_orgs]
    if cfg.output.export_model and len(final) > 0:
        load_trainable(model, final)
        extra["model"]["export"] = export_model(model, build_tokenizer(cfg.model.name), run_dir / "model")
    extra["wall_time_s"] = round(time.monotonic() - started, 1)
    summary = build_summary(tracker, cfg.to_dict(), extra)
    write_summary(run_dir, summary)
    return summary


def _plain_strategy(cfg, tracker, num_nodes, budget, run_dir, extra) -> BudgetGatedStrategy:
    """Flower's strategy, wrapped by Flower's server-side DP when organisation-level DP is on, then the budget gate."""
    if not cfg.client_dp.enabled:
        return BudgetGatedStrategy(
            build_strategy(cfg.strategy, tracker, num_nodes), budget, max_update_norm=cfg.strategy.max_update_norm
        )
    from server import client_dp

    inner = build_strategy(cfg.strategy, tracker, num_nodes, weighted_by_key=protocol.UNIT_WEIGHT)
    sampled = max(min(cfg.strategy.min_train_nodes, num_nodes), int(cfg.strategy.fraction_train * num_nodes))
    account = client_dp.ClientDPAccount(cfg.client_dp, run_dir, sampled, say=tracker.printer)
    extra["client_dp"] = account.summary()
    tracker.printer(
        f"organisation-level DP: {cfg.client_dp.clipping} clipping, noise multiplier {cfg.client_dp.noise_multiplier},"
        f" {sampled} organisations per round, budget epsilon {cfg.client_dp.max_epsilon:g} at delta"
        f" {cfg.client_dp.delta:g}"
    )
    wrapped = client_dp.wrap(cfg.client_dp, inner, sampled)
    gated = BudgetGatedStrategy(wrapped, budget, client_dp=account, max_update_norm=cfg.strategy.max_update_norm)
    return gated


def _after_round(run_dir, server_round, arrays, keep, tracker, cfg, extra) -> None:
    save_checkpoint(run_dir, server_round, arrays, keep_last=keep)
    write_summary(run_dir, build_summary(tracker, cfg.to_dict(), extra))
    write_metrics_csv(run_dir, tracker)
    # a deployment node reports its own target (its node.yaml); a simulated one the run config's
    targets = {
        org: report.get("target_epsilon") or cfg.privacy.target_for(org)[0] for org, report in tracker.privacy.items()
    }
    write_plot(run_dir, tracker, targets)


def build_server_app(
    config: FedPrivConfig | None = None, run_dir: Path | None = None, num_nodes: int | None = None
) -> ServerApp:
    """The ServerApp; with ``config`` None it is read from the run config (``flwr run``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config or config_from_context(context)
        folder = run_dir or run_dir_for(cfg)
        nodes = num_nodes or cfg.strategy.min_available_nodes or cfg.partitioning.num_orgs
        run_federation(PromptGrid(grid, default_timeout=cfg.strategy.round_timeout), context, cfg, Path(folder), nodes)

    return app


app = build_server_app()
