"""The run folder of one run, as the round loop writes it: checkpoints, summary.json, metrics.csv, the resume point
and progress.png.

The ServerApp's round loop (fedpriv/server/server_app.py) calls this object at the run's start, at every round's
end and at the run's end; it keeps what summary.json says beside the rounds (the model, the rejected updates,
organisation-level DP, the pre-flight, the budget) so that a run stopped half-way still gets a summary of the
rounds it did (:meth:`RunRecord.stopped`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from fedpriv.kernel.config import FedPrivConfig
from fedpriv.kernel.errors import UserError
from fedpriv.privacy.org_plan import org_target
from fedpriv.server.budget_gate import BudgetGatedStrategy, BudgetState
from fedpriv.server.checkpoints import checkpoint_path, save_checkpoint
from fedpriv.server.ledger_store import LedgerStore
from fedpriv.server.progress_plot import ProgressPlots
from fedpriv.server.reports import build_summary, write_metrics_csv, write_summary
from fedpriv.server.resume import (
    ResumePoint,
    prune_checkpoints,
    restore_strategy_state,
    save_strategy_state,
    write_resume_point,
)
from fedpriv.server.round_tracker import RoundTracker


class RunRecord:
    """What one run writes into its folder, and what its summary.json says beside the rounds.

    Use: ``with RunRecord(run_dir, cfg, resume) as record``, then :meth:`begin` once the classes and the model are
    known; the tracker (:attr:`tracker`) calls :meth:`end_round` after every round; :meth:`conclude` and
    :meth:`write_final` end the run, :meth:`stopped` ends one an error stopped.
    """

    def __init__(self, run_dir: Path, cfg: FedPrivConfig, resume: ResumePoint | None = None) -> None:
        self.run_dir, self.cfg, self.resume = run_dir, cfg, resume
        self.started = time.monotonic() - (resume.elapsed_s if resume else 0.0)
        self.plots = ProgressPlots(run_dir)  # progress.png, drawn beside the rounds
        self.tracker: RoundTracker | None = None  # set by begin(): until then nothing of the run was built
        self.budget: BudgetState | None = None
        self.latest: ArrayRecord | None = None  # the global model after the last complete round (before: initial)
        self._stateful = None  # the strategy whose round-to-round state goes into every resume point
        self._gate: BudgetGatedStrategy | None = None  # the plain path's: its rejections and client-DP account
        # summary.json beside the rounds, in the order it has always had
        self.label_names: list[str] = []
        self.model: dict[str, Any] = {}
        self.status = "running"
        self.rejected_updates: list[dict[str, Any]] = []  # plain path: updates that failed update_checks.py
        self.resumes: list[int] = []  # the rounds after which a restarted coordinator resumed the run
        self.secure_aggregation: dict[str, Any] | None = None
        self.preflight: dict[str, Any] | None = None
        self.client_dp: dict[str, Any] | None = None
        self.stopped_reason: str | None = None
        self.diverged: list[dict[str, Any]] | None = None
        self._ended: dict[str, Any] = {}  # budget and rounds_without_training, once the rounds are over

    def __enter__(self) -> RunRecord:
        return self

    def __exit__(self, *exc) -> None:
        self.plots.close()

    # -- the run's start

    def begin(self, labels: list[str], model: dict[str, Any], initial: ArrayRecord) -> None:
        """Build the round tracker and the budget state; continue a resumed run's records, else write round 0's
        resume point."""
        cfg, resume = self.cfg, self.resume
        self.tracker = RoundTracker(
            num_rounds=cfg.training.rounds,
            num_labels=len(labels),
            dp_enabled=cfg.privacy.enabled,
            on_round_end=self.end_round,
            label_names=labels,
        )
        self.budget = BudgetState(LedgerStore(self.run_dir, warn=self.tracker.printer), say=self.tracker.printer)
        self.label_names, self.model, self.latest = labels, model, initial
        if resume is None:
            write_resume_point(
                ResumePoint(self.run_dir, 0, cfg.to_dict(), [], {}, [], [], 0.0, checkpoint=None, strategy_state=None)
            )
        else:
            self.tracker.restore(resume.rounds, resume.privacy, resume.elapsed_s, resume.redaction)
            self.budget.refusals = list(resume.refusals)
            self.rejected_updates = list(resume.rejected_updates)
            self.resumes = [*resume.resumes, resume.round]

    def adopt_strategy(self, strategy) -> None:
        """Called by either path with its strategy: restore a resumed run's strategy state, keep it for saving."""
        resume = self.resume
        if resume is not None and resume.strategy_state_path is not None:
            restored = restore_strategy_state(strategy, resume.strategy_state_path)
            self.tracker.printer(f"strategy state after round {resume.round} restored: {', '.join(restored)}")
        self._stateful = strategy

    def watch_gate(self, gate: BudgetGatedStrategy) -> None:
        """The plain path's budget gate: its rejected updates and organisation-level DP account go into the summary."""
        self._gate = gate
        self._take_from_gate()

    def _take_from_gate(self) -> None:
        if self._gate is None:
            return
        self.rejected_updates = [r.to_dict() for r in self._gate.rejections]
        if self._gate.client_dp is not None:
            self.client_dp = self._gate.client_dp.summary()

    # -- every round

    def end_round(self, server_round: int, arrays: ArrayRecord) -> None:
        """The round's checkpoint, summary.json, metrics.csv and plot, then the resume point that names them."""
        tracker, cfg = self.tracker, self.cfg
        self.latest = arrays
        self._take_from_gate()
        save_checkpoint(self.run_dir, server_round, arrays)
        write_summary(self.run_dir, self.summary())
        write_metrics_csv(self.run_dir, tracker)
        self.plots.submit(tracker, epsilon_targets(cfg, tracker.privacy))
        point = ResumePoint(
            run_dir=self.run_dir,
            round=server_round,
            config=cfg.to_dict(),
            rounds=[record.to_dict() for record in tracker.rounds],
            privacy=tracker.privacy,
            rejected_updates=self.rejected_updates,
            refusals=self.budget.refusals,
            elapsed_s=tracker.elapsed_s,
            checkpoint=checkpoint_path(self.run_dir, server_round).name,
            strategy_state=(
                save_strategy_state(self.run_dir, server_round, self._stateful) if self._stateful is not None else None
            ),
            resumes=self.resumes,
            redaction=tracker.redaction,
        )
        write_resume_point(point)
        prune_checkpoints(self.run_dir, point, self.cfg.output.keep_checkpoints)

    # -- the run's end

    def stop_on_divergence(self, reason: str) -> None:
        """Local training stopped being finite: the run fails; what the diverged nodes spent is still counted."""
        self.stopped_reason = reason
        for report in self.budget.diverged_privacy:
            self.tracker.note_privacy(report)

    def conclude(self) -> dict[str, Any]:
        """The rounds are over: the run's status, budget and rounds without training; the summary, built once (the
        model export, if any, is then added by :meth:`write_final`)."""
        budget, tracker = self.budget, self.tracker
        self._take_from_gate()
        self.diverged = list(budget.diverged)  # organisations whose local training stopped being finite
        trained = [record for record in tracker.rounds if record.trained_orgs]
        if budget.stopped_reason:
            self.status = "budget_exhausted"
        elif self.stopped_reason is not None:
            self.status = "failed"
        else:
            self.status = "completed" if len(trained) == self.cfg.training.rounds else "incomplete"
        self._end_fields()
        return self.summary()

    def write_final(self, summary: dict[str, Any], export: dict[str, str] | None = None) -> dict[str, Any]:
        """Write :meth:`conclude`'s summary, with the exported model's files (``export``) and the wall time."""
        if export is not None:
            self.model["export"] = export  # summary["model"] is this same dict
        summary["wall_time_s"] = self._ended["wall_time_s"] = round(time.monotonic() - self.started, 1)
        write_summary(self.run_dir, summary)
        return summary

    def stopped(self, error: UserError) -> dict[str, Any]:
        """Print ``error`` as one line and write the summary of the rounds done, status ``incomplete``.

        The resume point (written after each complete round) stays as it was: once the cause is fixed, ``--resume``
        continues the run. If the summary itself cannot be written, the same line says so.
        """
        if self.tracker is None:  # stopped before anything of the run was built: nothing to summarise
            print(f"error: {error}", file=sys.stderr, flush=True)
            return {"status": "incomplete", "error": str(error), "run_dir": str(self.run_dir)}
        done = len(self.tracker.rounds)
        self.status = "incomplete"
        self._end_fields()
        summary = self.summary(error=str(error))
        where = f"the run stopped after round {done} of {self.cfg.training.rounds}"
        try:
            write_summary(self.run_dir, summary)
        except UserError as again:
            print(
                f"error: {error}; {where}, and its summary could not be updated: {again}", file=sys.stderr, flush=True
            )
            return summary
        print(
            f"error: {error}; {where} (summary.json status 'incomplete'; once fixed, --resume {self.run_dir} continues it)",
            file=sys.stderr,
            flush=True,
        )
        return summary

    def _end_fields(self) -> None:
        budget = self.budget
        self._ended = {
            "budget": {
                "stopped_reason": budget.stopped_reason,
                "refusals": budget.refusals,
                "ledgers": {org: dict(head) for org, head in sorted(budget.ledgers.heads.items())},
            },
            "rounds_without_training": [record.round for record in self.tracker.rounds if not record.trained_orgs],
            "wall_time_s": round(time.monotonic() - self.started, 1),
        }

    # -- summary.json

    def summary(self, error: str | None = None) -> dict[str, Any]:
        """summary.json as it stands: the tracker's rounds and privacy, then this record's fields."""
        fields: dict[str, Any] = {
            "run_dir": str(self.run_dir),
            "label_names": self.label_names,
            "model": self.model,
            "status": self.status,
            "rejected_updates": self.rejected_updates,
            "resumes": self.resumes,
        }
        optional = {
            "secure_aggregation": self.secure_aggregation,
            "preflight": self.preflight,
            "client_dp": self.client_dp,
            "stopped_reason": self.stopped_reason,
            "diverged": self.diverged,
            "error": error,
        }
        fields.update({key: value for key, value in optional.items() if value is not None})
        ended = dict(self._ended)
        if error is None:
            ended.pop("wall_time_s", None)  # a finished run's: added by write_final, after the model export
        fields.update(ended)
        return build_summary(self.tracker, self.cfg.to_dict(), fields)


def epsilon_targets(cfg: FedPrivConfig, reports: dict[str, dict]) -> dict[str, float]:
    """Each reporting organisation's target epsilon, for the progress plot: what its node reported (a deployment
    node's own node.yaml), else the run config's for it."""
    return {org: org_target(cfg, org, report)[0] for org, report in reports.items()}
