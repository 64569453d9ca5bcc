"""Run a federation of virtual organisations on this machine with Flower's simulation engine (Ray).

Everything a user can get wrong is checked first (config, data, partitions,
model, device, privacy targets), so a mistake stops the run with one line
before any training.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpriv.client.data_report import RARE_LABEL_COUNT, Truncation
from fedpriv.data.partitioning import PartitionPlan, plan_partitions
from fedpriv.kernel import atomic_files
from fedpriv.kernel.config import FedPrivConfig
from fedpriv.kernel.errors import ConfigError, UserError
from fedpriv.kernel.interrupts import Interrupted
from fedpriv.kernel.quiet import VERBOSE_ENV, quiet_third_party_warnings
from fedpriv.kernel.run_lock import RunLock, lock_run_dir
from fedpriv.privacy.calibration import PrivacyPlan
from fedpriv.server.resume import ResumePoint


@dataclass(frozen=True)
class SimulationPlan:
    partitions: PartitionPlan
    privacy: dict[str, PrivacyPlan]  # empty when DP is off
    # each organisation's texts (train + test) cut at data.max_length by tokenisation (client/data_report.py)
    truncation: dict[str, Truncation] = dataclasses.field(default_factory=dict)

    def data_report(self) -> dict[str, Any]:
        """summary.json's ``data``: classes, each organisation's class counts and truncation, the rare classes."""
        parts = self.partitions
        counts = parts.label_counts()
        totals = {name: sum(c[split][name] for c in counts.values() for split in c) for name in parts.label_names}
        return {
            "label_names": list(parts.label_names),
            "class_counts": counts,
            "rare_labels": {name: n for name, n in totals.items() if n < RARE_LABEL_COUNT},
            "truncation": {org: cut.to_dict() for org, cut in self.truncation.items()},
        }


def preflight(cfg: FedPrivConfig) -> SimulationPlan:
    """Load and partition the data, check model and device, calibrate every organisation's noise."""
    from fedpriv.client.device import resolve_device
    from fedpriv.client.progress import progress_interval
    from fedpriv.privacy.org_plan import org_privacy_plan, org_target
    from fedpriv.shared_models.sources import model_source

    model_source(cfg.model.name)
    resolve_device(cfg.training.device)
    progress_interval()  # a bad $FEDPRIV_PROGRESS_S stops here, not in every node
    partitions = plan_partitions(cfg)
    privacy: dict[str, PrivacyPlan] = {}
    if cfg.privacy.enabled:
        # A plan depends only on the organisation's training-set size and target, never on its name: calibrate
        # each distinct one once (10,000 IID shares have 2-3 sizes; calibration takes about a second each).
        calibrated: dict[tuple[int, tuple[float, float]], PrivacyPlan] = {}
        for org in partitions.orgs:
            target = org_target(cfg, org.name)
            key = (len(org.train), target)
            if key not in calibrated:
                calibrated[key] = org_privacy_plan(cfg, org.name, len(org.train), target)
            privacy[org.name] = calibrated[key]
    if cfg.secure_aggregation.enabled:
        from fedpriv.server.secure_rounds import secagg_shares

        secagg_shares(cfg, len(partitions.orgs))  # SecAgg+'s own limits, before any training
    unknown = sorted(set(cfg.privacy.orgs) - {org.name for org in partitions.orgs})
    if unknown:
        names = ", ".join(org.name for org in partitions.orgs)
        raise ConfigError(f"config: privacy.orgs: unknown organisation(s) {unknown}; organisations are: {names}")
    if cfg.canary_audit.enabled and cfg.canary_audit.kind == "gradient":
        from fedpriv.client.node import trainable_layout
        from fedpriv.privacy.audit_canaries import check_fits

        layout = trainable_layout(cfg.model, partitions.label_names)
        check_fits(cfg, sum(math.prod(shape) for _, shape in layout))
    return SimulationPlan(partitions, privacy, _truncation(cfg, partitions))


_TRUNCATION_MEMO: dict[tuple[str, str], dict[str, Truncation]] = {}


def _truncation(cfg: FedPrivConfig, partitions: PartitionPlan) -> dict[str, Truncation]:
    """Each organisation's share of texts (train + test, before redaction) cut at ``data.max_length``.

    Memoised like the partitions (same key, plus the tokenizer's model), and kept on disk for the next
    process (simulations/truncation_cache.py): tokenising a corpus takes seconds.
    """
    from fedpriv.data.partitioning import plan_key
    from fedpriv.shared_models.builder import build_tokenizer
    from fedpriv.shared_models.sources import minilm_dir, model_source
    from fedpriv.simulations.truncation_cache import plan_truncation

    key = (cfg.model.name, plan_key(cfg))
    if key not in _TRUNCATION_MEMO:
        if len(_TRUNCATION_MEMO) >= 8:
            _TRUNCATION_MEMO.pop(next(iter(_TRUNCATION_MEMO)))
        _TRUNCATION_MEMO[key] = plan_truncation(
            model_source(cfg.model.name) or minilm_dir(),
            lambda: build_tokenizer(cfg.model.name),
            {org.name: org.train.texts + org.test.texts for org in partitions.orgs},
            cfg.data.max_length,
        )
    return dict(_TRUNCATION_MEMO[key])


def describe_plan(cfg: FedPrivConfig, plan: SimulationPlan) -> str:
    parts = plan.partitions
    lines = [
        f"fedpriv simulate: {len(parts.orgs)} organisations, {cfg.training.rounds} round(s),"
        f" model {cfg.model.name} ({cfg.model.finetuning}), strategy {cfg.strategy.name},"
        f" partitioning {parts.scheme}, classes: {', '.join(parts.label_names)}",
    ]
    if cfg.privacy.enabled:
        lines.append(
            f"DP-SGD (Opacus, {cfg.privacy.accountant.upper()} accountant, clip C={cfg.privacy.max_grad_norm},"
            " noise calibrated once per organisation for all planned rounds):"
        )
    else:
        lines.append("DP is OFF: no differential privacy guarantee (baseline run).")
    red = cfg.redaction
    if red.enabled:
        lines.append(
            f"Redaction ON before tokenisation (rules {red.rules}: {', '.join(red.kinds)}; locales"
            f" {', '.join(red.locales)}): each node redacts its text once when it first loads it"
        )
    if cfg.canary_audit.enabled:
        from fedpriv.privacy.org_plan import org_target
        from fedpriv.simulations.canary_audit import plan_line

        audited = parts.orgs[cfg.canary_audit.org].name
        coordinates = None
        if cfg.canary_audit.kind == "gradient":
            from fedpriv.client.node import trainable_layout

            coordinates = sum(math.prod(shape) for _, shape in trainable_layout(cfg.model, parts.label_names))
        lines.append(plan_line(cfg, audited, org_target(cfg, audited)[1], coordinates))
    from fedpriv.server.preflight import describe_row

    width = max(len(org.name) for org in parts.orgs)
    for org in parts.orgs:
        row: dict[str, Any] = {"org": org.name, "train_examples": len(org.train), "test_examples": len(org.test)}
        p = plan.privacy.get(org.name)
        if p is not None:
            row |= {
                "target_epsilon": p.target_epsilon,
                "delta": p.delta,
                "noise_multiplier": p.noise_multiplier,
                "sample_rate": p.sample_rate,
                "planned_steps": p.planned_steps,
            }
        lines.append(describe_row(row, width))
    lines += _data_lines(plan)
    return "\n".join(lines)


def _data_lines(plan: SimulationPlan) -> list[str]:
    """The class counts of every organisation (train + test), the rare classes and the texts cut short."""
    from fedpriv.client.data_report import class_table, counts_by_class, rare_label_warning, truncation_lines

    parts = plan.partitions
    k = len(parts.label_names)
    rows = [
        (org.name, len(org.train), len(org.test), counts_by_class(org.train.labels + org.test.labels, k))
        for org in parts.orgs
    ]
    lines = ["class counts (train + test), in the class order of the data:", *class_table(parts.label_names, rows)]
    totals = [sum(row[3][i] for row in rows) for i in range(k)]
    lines += [line for line in [rare_label_warning(parts.label_names, totals)] if line]
    return lines + truncation_lines(plan.truncation)


def resolve_run_dir(cfg: FedPrivConfig) -> tuple[Path, RunLock]:
    """The run folder (``--out``, else a fresh ``runs/<timestamp>/``), locked for this run (fedpriv/kernel/run_lock.py)."""
    from fedpriv.server.server_app import new_run_dir

    path = Path(cfg.run.out_dir).resolve() if cfg.run.out_dir else new_run_dir("runs")
    lock = lock_run_dir(path, fresh=True)
    try:
        atomic_files.check_writable(path)  # a read-only or full folder: one line now, not a traceback later
    except BaseException:
        lock.release()
        raise
    return path, lock


class NodeFailuresOnly(logging.Filter):
    """Keeps Flower's per-round INFO chatter out of the progress, but never a node's error reply.

    Also drops Flower's notice that ``run_simulation`` is deprecated: fedpriv
    uses it on purpose (in-process, no detached SuperLink left behind).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if "DEPRECATED FEATURE" in str(record.msg) and "run_simulation" in str(record.args):
            return False
        return record.levelno >= logging.WARNING or "error in reply" in str(record.msg)


def _quiet_logs(verbose: bool) -> None:
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # simulation workers inherit it: Flower's debug output stays on
        return
    flwr_logger = logging.getLogger("flwr")
    if not any(isinstance(f, NodeFailuresOnly) for f in flwr_logger.filters):
        flwr_logger.addFilter(NodeFailuresOnly())
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def _progress_through_ray() -> None:
    """Let the nodes' progress lines (client/progress.py) through Ray's log deduplication as they are.

    Ray reads the variable when it is first imported (``ray_constants``), so this runs before Flower's simulation
    module imports it; a user's own setting wins.
    """
    from fedpriv.client.progress import RAY_ALLOW_REGEX

    os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", RAY_ALLOW_REGEX)


# A private Ray instance starts no idle workers ahead of demand: it would start one per CPU ("ray::IDLE", about
# 0.3 s of CPU each), which Flower's actors never use (each actor gets a worker of its own).
PRIVATE_RAY_SYSTEM_CONFIG = {"prestart_worker_first_driver": False, "enable_worker_prestart": False}


def backend_config(cfg: FedPrivConfig, verbose: bool) -> dict[str, Any]:
    """Flower's Ray backend settings; ``init_args`` go to ``ray.init``.

    ``address``: the existing cluster ``simulation.ray_address`` names, else "local": a private Ray instance,
    even when RAY_ADDRESS is set or ``ray start`` left a cluster on this machine (which Ray's default joins);
    only a private instance gets ``PRIVATE_RAY_SYSTEM_CONFIG``.
    """
    resources = cfg.simulation.client_resources
    init_args: dict[str, Any] = {"address": cfg.simulation.ray_address or "local", "include_dashboard": False}
    if init_args["address"] == "local":  # Ray refuses a system config when joining a cluster
        init_args["_system_config"] = dict(PRIVATE_RAY_SYSTEM_CONFIG)
    if not verbose:
        init_args.update({"logging_level": logging.ERROR, "log_to_driver": True, "configure_logging": True})
    return {
        "client_resources": {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus},
        "init_args": init_args,
    }


def run_simulation_from_config(
    cfg: FedPrivConfig, *, dry_run: bool = False, verbose: bool = False, resume: ResumePoint | None = None
) -> dict | None:
    """Plan, then run the simulation (or continue ``resume``'s run); returns the summary (None for a dry run)."""
    if not verbose:
        quiet_third_party_warnings()
    plan = preflight(cfg)
    print(describe_plan(cfg, plan), flush=True)
    if dry_run:
        return None
    if resume is not None:
        from fedpriv.server.resume import load_resume_point, resumable

        lock = lock_run_dir(resume.run_dir, fresh=False, flag="--resume")
        try:  # read again now that no other run can write it
            resume = resumable(load_resume_point(resume.run_dir))
        except BaseException:
            lock.release()
            raise
        run_dir = resume.run_dir
        atomic_files.check_writable(run_dir)
        print(f"run folder: {run_dir} (resumed after round {resume.round} of {cfg.training.rounds})", flush=True)
    else:
        run_dir, lock = resolve_run_dir(cfg)
        print(f"run folder: {run_dir}", flush=True)
    with lock:
        return _run_locked(cfg, plan, run_dir, verbose, resume)


def _run_locked(
    cfg: FedPrivConfig, plan: SimulationPlan, run_dir: Path, verbose: bool, resume: ResumePoint | None
) -> dict:
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=str(run_dir)))

    _progress_through_ray()  # before Ray is imported (in the simulation's child)
    from fedpriv.server.reports import SUMMARY_FILE
    from fedpriv.server.resume import ENDED

    code = _simulate_in_child(cfg, run_dir, len(plan.partitions.orgs), verbose, resume)
    if code == STOPPED_EXIT:  # a disk error stopped the run: the child printed its one line and its report
        return {"status": "incomplete", "exit_code": 1}
    summary_path = run_dir / SUMMARY_FILE
    if not summary_path.exists():
        if code == 0:
            print(f"the simulation ended without writing {summary_path}; rerun with --verbose to see why", flush=True)
        return {"status": "failed", "exit_code": code or 1}
    import json

    summary = json.loads(summary_path.read_text())
    if code != 0 and summary.get("status") not in ENDED:
        return {"status": "failed", "exit_code": code}  # the child said why (one error line, or its traceback)
    from fedpriv.server.reports import final_report, write_summary

    summary["data"] = plan.data_report()  # the simulation's own view of the data it partitioned (nothing sent)
    write_summary(run_dir, summary)
    if cfg.canary_audit.enabled and summary.get("rounds"):
        from fedpriv.simulations.canary_audit import describe, run_canary_audit

        summary["empirical_audit"] = run_canary_audit(cfg, run_dir, summary)
        write_summary(run_dir, summary)
    print(final_report(summary), flush=True)
    if "empirical_audit" in summary:
        print(describe(summary["empirical_audit"]), flush=True)
    if summary.get("status") == "failed" and summary.get("stopped_reason"):
        from fedpriv.kernel.errors import TrainingFailed

        raise TrainingFailed(summary["stopped_reason"])
    return summary


STOPPED_EXIT = 75  # the simulation's child: an error (a full disk) stopped the run; it printed its line and report


def _simulate_in_child(
    cfg: FedPrivConfig, run_dir: Path, num_nodes: int, verbose: bool, resume: ResumePoint | None
) -> int:
    """Run Flower's simulation in a forked child in its own session; its exit code.

    The same ServerApp and ClientApp as in-process, only in a process this one can stop: on Ctrl-C or SIGTERM
    the child and everything under it (Ray) is killed, the run folder marked ``interrupted`` and Interrupted
    raised (fedpriv/kernel/interrupts.py says why Flower's own threads cannot be interrupted in-process).
    """
    from fedpriv.kernel import interrupts
    from fedpriv.server.reports import mark_interrupted

    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    with interrupts.deferred_signals() as stop:
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                interrupts.become_session_leader(parent)
                code = _simulate_here(cfg, run_dir, num_nodes, verbose, resume)
            except UserError as exc:
                print(f"error: {exc}", file=sys.stderr)
                code = exc.exit_code
            except BaseException:  # noqa: BLE001 - the child must never return into the parent's code
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        while stop.signum is None:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                interrupts.stop_tree(pid)  # what it left behind: Ray's agents outlive a driver killed by the kernel
                return _exit_code(os.waitstatus_to_exitcode(status), run_dir)
            time.sleep(0.2)
        left = interrupts.stop_tree(pid)  # a second Ctrl-C meanwhile is only noted: the cleanup always finishes
        rounds = mark_interrupted(run_dir, stop.signum)
    name = signal.Signals(stop.signum).name
    stopped = f"{len(left)} process(es) could not be stopped: {sorted(left)}" if left else "every process stopped"
    raise Interrupted(
        f"interrupted ({name}): {stopped}; {run_dir} marked interrupted after round {rounds} of"
        f" {cfg.training.rounds}; continue it with: fedpriv simulate --resume {run_dir}",
        stop.signum,
    )


def _exit_code(code: int, run_dir: Path) -> int:
    """The child's exit code; a child killed by a signal (the kernel's OOM killer: SIGKILL) is said in one line."""
    if code >= 0:
        return code
    print(
        f"error: the simulation's process was killed by {signal.Signals(-code).name} (out of memory?); {run_dir}"
        f" can be continued with: fedpriv simulate --resume {run_dir}",
        file=sys.stderr,
        flush=True,
    )
    return 128 - code


def _simulate_here(cfg: FedPrivConfig, run_dir: Path, num_nodes: int, verbose: bool, resume: ResumePoint | None) -> int:
    """Flower's simulation in this process; 0, or STOPPED_EXIT when an error stopped the run (already said)."""
    from flwr.simulation import run_simulation

    from fedpriv.client.client_app import build_client_app
    from fedpriv.server.server_app import build_server_app

    _quiet_logs(verbose)
    outcome: dict = {}
    run_simulation(
        server_app=build_server_app(cfg, run_dir, num_nodes, resume=resume, outcome=outcome),
        client_app=build_client_app(cfg),
        num_supernodes=num_nodes,
        backend_config=backend_config(cfg, verbose),
        verbose_logging=verbose,
    )
    stopped = outcome.get("summary") if (outcome.get("summary") or {}).get("error") else None
    if stopped is None:
        return 0
    from fedpriv.server.reports import final_report

    if "config" in stopped:  # a disk error after the run was built (one line already): its report, even if
        print(final_report(stopped), flush=True)  # summary.json could not be updated to say it
    return STOPPED_EXIT
