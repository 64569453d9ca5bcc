"""The coordinator's Flower ServerApp: runs the rounds with a Flower strategy and writes the run files.

``fedpriv simulate`` builds it with the resolved config and run folder
(``build_server_app(cfg, run_dir)``); under ``flwr run`` the module-level
``app`` reads ``config``/``overrides`` from the run config.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedpriv.kernel import atomic_files, protocol
from fedpriv.kernel.config import FedPrivConfig, config_from_dict
from fedpriv.kernel.errors import ConfigError, UserError
from fedpriv.kernel.quiet import quiet_third_party_warnings
from fedpriv.kernel.run_config import RESUME_KEY, config_from_context
from fedpriv.kernel.run_lock import new_run_problem
from fedpriv.server.budget_gate import BudgetExhausted, BudgetGatedStrategy, TrainingDiverged
from fedpriv.server.checkpoints import load_checkpoint
from fedpriv.server.preflight import preflight_wanted, run_preflight
from fedpriv.server.prompt_grid import PromptGrid
from fedpriv.server.resume import (
    ResumeError,
    ResumePoint,
    load_resume_point,
    resumable,
)
from fedpriv.server.run_record import RunRecord
from fedpriv.server.secure_rounds import run_secure_rounds, secagg_shares
from fedpriv.server.strategy import build_strategy
from fedpriv.server.update_checks import Rejection, update_problem
from fedpriv.shared_models.builder import build_model, build_tokenizer
from fedpriv.shared_models.export import export_model
from fedpriv.shared_models.weights import base_model_digest, count_trainable, load_trainable, trainable_arrays

log = logging.getLogger("fedpriv.server")


def new_run_dir(base: str | Path = "runs") -> Path:
    """A fresh ``runs/<timestamp>/`` folder (suffixed if two runs start in the same second)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(base) / stamp
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path(base) / f"{stamp}-{suffix}"
    with atomic_files.writing(path.resolve()):
        path.mkdir(parents=True)
    atomic_files.check_writable(path)
    return path.resolve()


def run_dir_for(cfg: FedPrivConfig) -> Path:
    """``run.out_dir`` itself when set (refused unless a new run may use it: fedpriv.kernel.run_lock.new_run_problem,
    the rule ``fedpriv simulate`` and ``fedpriv federation up`` follow too), else a fresh ``runs/<timestamp>/``."""
    if not cfg.run.out_dir:
        return new_run_dir("runs")
    path = Path(cfg.run.out_dir).resolve()
    problem = new_run_problem(path)
    if problem is not None:
        raise ConfigError(f"run.out_dir {path}: {problem}")
    atomic_files.make_folder(path)
    atomic_files.check_writable(path)
    return path


def label_names(cfg: FedPrivConfig) -> list[str]:
    """Class names: fixed by the config (always so in deployment), or read from the data the simulation partitions."""
    if cfg.data.labels.names:
        return list(cfg.data.labels.names)
    from fedpriv.data.partitioning import plan_partitions  # simulation only: a deployment run names its classes

    return list(plan_partitions(cfg).label_names)


def run_federation(
    grid: Grid,
    context: Context,
    cfg: FedPrivConfig,
    run_dir: Path,
    num_nodes: int,
    resume: ResumePoint | None = None,
) -> dict:
    """Run all rounds (after ``resume.round`` when resuming); returns the summary (also in ``run_dir/summary.json``).

    A file that cannot be written (full disk, read-only folder) or another one-line error stops the run: the
    line is printed, and the summary says ``incomplete`` with the line in ``error`` (see :meth:`RunRecord.stopped`).
    """
    with RunRecord(run_dir, cfg, resume) as record:
        try:
            return _run_federation(grid, context, cfg, num_nodes, resume, record)
        except Exception as exc:
            if isinstance(exc, UserError):
                error = exc
            elif atomic_files.is_disk_failure(exc):  # a write no call site translated: name what the error names
                error = atomic_files.disk_error(getattr(exc, "filename", None) or run_dir, exc)
            else:
                raise
            return record.stopped(error)


def _run_federation(
    grid: Grid,
    context: Context,
    cfg: FedPrivConfig,
    num_nodes: int,
    resume: ResumePoint | None,
    record: RunRecord,
) -> dict:
    run_dir = record.run_dir
    labels = label_names(cfg)
    model = build_model(cfg.model, labels)
    trainable, total = count_trainable(model)
    initial = trainable_arrays(model)
    upload_bytes = initial.count_bytes()
    done = resume.round if resume else 0
    if resume is not None and resume.checkpoint_path is not None:
        initial = checkpoint_like(resume.checkpoint_path, initial)
    model_facts = {
        "name": cfg.model.name,
        "finetuning": cfg.model.finetuning,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "upload_bytes_per_round": upload_bytes,
    }
    record.begin(labels, model_facts, initial)
    tracker, budget = record.tracker, record.budget

    digest = base_model_digest(model)
    if not cfg.privacy.enabled:
        tracker.printer("DP is OFF: this run gives NO differential privacy guarantee (baseline only).")
    if cfg.secure_aggregation.enabled:
        shares, threshold = secagg_shares(cfg, num_nodes)
        tracker.printer(f"secure aggregation (SecAgg+): {shares} shares, rounds need {threshold} organisations")
        record.secure_aggregation = {"num_shares": shares, "reconstruction_threshold": threshold}
    node_config = {protocol.RUN_DIR: str(run_dir), protocol.BASE_DIGEST: digest}
    if cfg.training.rounds - done > 0 and preflight_wanted(cfg, grid):
        record.preflight = run_preflight(
            grid,
            cfg,
            node_config=node_config,
            num_nodes=num_nodes,
            budget=budget,
            say=tracker.printer,
            elapsed=lambda: tracker.elapsed_s,
        )
        tracker.nodes_prepared = bool(record.preflight["ready"])
    remaining = cfg.training.rounds - done
    try:
        if remaining <= 0:
            final = initial  # the coordinator stopped after the last round, before the run's files were final
        elif cfg.secure_aggregation.enabled:
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
                round_offset=done,
                adopt_strategy=record.adopt_strategy,
            )
        else:
            rejections = [Rejection(**raw) for raw in record.rejected_updates]
            strategy = _plain_strategy(cfg, tracker, num_nodes, budget, run_dir, done, rejections)
            record.watch_gate(strategy)
            record.adopt_strategy(strategy)
            final = strategy.start(
                grid=grid,
                initial_arrays=initial,
                num_rounds=remaining,
                timeout=cfg.strategy.round_timeout,
                train_config=ConfigRecord(node_config),
                evaluate_config=ConfigRecord(node_config),
                evaluate_fn=lambda rnd, arrays: tracker.end_of_round(rnd + done if rnd else 0, arrays),
            ).arrays
    except BudgetExhausted as exc:
        tracker.printer(f"run ended after round {len(tracker.rounds)} of {cfg.training.rounds}: {exc}")
        final = record.latest
    except TrainingDiverged as exc:  # the last complete round's model stays the run's model
        stopped_in = budget.diverged[-1]["round"] if budget.diverged else len(tracker.rounds) + 1
        tracker.printer(f"run stopped in round {stopped_in} of {cfg.training.rounds}: local training diverged")
        record.stop_on_divergence(str(exc))
        final = record.latest
    summary = record.conclude()
    if not (cfg.output.export_model and len(final) > 0):
        return record.write_final(summary)
    load_trainable(model, final)
    target = run_dir / "model"
    with atomic_files.replacing_folder(target) as folder:  # a full disk leaves no half-exported model
        paths = export_model(
            model,
            build_tokenizer(cfg.model.name),
            folder,
            tracker.redaction,
            max_length=_trained_max_length(cfg, grid, summary),
            summary=summary,  # the card names its results and privacy
        )
    return record.write_final(summary, {name: atomic_files.relocated(p, folder, target) for name, p in paths.items()})


def _trained_max_length(cfg: FedPrivConfig, grid: Grid, summary: dict) -> int | None:
    """The tokens per text the organisations trained at: what their nodes said before round 1 (in a deployment
    each node.yaml sets its own; the largest), else in a simulation the run config's; None when unknown."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    said = [row["max_length"] for row in (summary.get("preflight") or {}).get("ready", []) if "max_length" in row]
    if said:
        return max(said)
    return cfg.data.max_length if isinstance(getattr(grid, "grid", grid), InMemoryGrid) else None


def checkpoint_like(path: Path, model_arrays: ArrayRecord) -> ArrayRecord:
    """A resume checkpoint's weights, in the model's tensor order; refused unless names and shapes match."""
    saved = load_checkpoint(path)
    problem = update_problem(RecordDict({protocol.ARRAYS: saved}), model_arrays, None)
    if problem is not None:
        raise ResumeError(f"{path}: does not fit this run's model: {problem}")
    return ArrayRecord({name: saved[name] for name in model_arrays})


def _plain_strategy(cfg, tracker, num_nodes, budget, run_dir, round_offset=0, rejections=()) -> BudgetGatedStrategy:
    """Flower's strategy, behind organisation-level DP's fixed-denominator release when it is on, then the budget gate."""
    gate = dict(max_update_norm=cfg.strategy.max_update_norm, round_offset=round_offset, rejections=rejections)
    if not cfg.client_dp.enabled:
        return BudgetGatedStrategy(build_strategy(cfg.strategy, tracker, num_nodes), budget, **gate)
    from fedpriv.server import client_dp

    inner = build_strategy(cfg.strategy, tracker, num_nodes, weighted_by_key=protocol.UNIT_WEIGHT)
    sampled = cfg.strategy.planned_train_nodes(num_nodes)  # the fixed denominator, set before round 1
    account = client_dp.ClientDPAccount(cfg.client_dp, run_dir, sampled, say=tracker.printer)
    tracker.printer(
        f"organisation-level DP: {cfg.client_dp.clipping} clipping, noise multiplier {cfg.client_dp.noise_multiplier},"
        f" {sampled} organisations per round, budget epsilon {cfg.client_dp.max_epsilon:g} at delta"
        f" {cfg.client_dp.delta:g}"
    )
    wrapped = client_dp.wrap(cfg.client_dp, inner, sampled)
    return BudgetGatedStrategy(wrapped, budget, client_dp=account, **gate)


def build_server_app(
    config: FedPrivConfig | None = None,
    run_dir: Path | None = None,
    num_nodes: int | None = None,
    resume: ResumePoint | None = None,
    outcome: dict | None = None,
) -> ServerApp:
    """The ServerApp; with ``config`` None it is read from the run config (``flwr run``), ``resume`` included.

    ``outcome`` (simulation: the same process) receives the run's summary under ``"summary"``, also when
    summary.json could not be written.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            cfg = config or config_from_context(context)
            point = resume if config is not None else resume_from_run_config(context, cfg)
            folder = point.run_dir if point is not None else (run_dir or run_dir_for(cfg))
        except UserError as exc:  # one line, never a traceback from inside Flower
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return
        nodes = num_nodes or cfg.strategy.min_available_nodes or cfg.partitioning.num_orgs
        grid = PromptGrid(grid, default_timeout=cfg.strategy.round_timeout)
        summary = run_federation(grid, context, cfg, Path(folder), nodes, resume=point)
        if outcome is not None:
            outcome["summary"] = summary

    return app


def resume_from_run_config(context: Context, cfg: FedPrivConfig) -> ResumePoint | None:
    """``resume = "RUN_DIR"`` in the run config: continue that run, whose config the run config must still give.

    The ClientApps read their config from the same run config: a resumed run keeps the ``config`` and
    ``overrides`` it started with (every node's noise was calibrated for that plan) and adds ``resume``.
    """
    folder = str(context.run_config.get(RESUME_KEY, "") or "")
    if not folder:
        return None
    point = resumable(load_resume_point(folder))
    stored = config_from_dict(point.config).to_dict()
    changed = sorted(_changed_keys(stored, cfg.to_dict()))
    if changed:
        raise ConfigError(
            f"run config: {RESUME_KEY}={folder} continues a run with the config it started with, but this run"
            f" config changes {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}: give the same"
            " config and overrides as the first `flwr run`, plus resume"
        )
    return point


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


quiet_third_party_warnings()  # the deployment ServerApp process builds the model too (PEFT's deprecated call)
app = build_server_app()
