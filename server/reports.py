"""Run files people and programs read: summary.json and metrics.csv (the plot: server/progress_plot.py), and the
report printed when a run ends, whichever command ran it (``fedpriv simulate``, ``fedpriv federation up``)."""

from __future__ import annotations

import csv
import io
import json
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedpriv.kernel import atomic_files
from fedpriv.server.round_tracker import RoundTracker

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.csv"
INTERRUPTED = "interrupted"  # summary.json's status of a run stopped by a signal: resumable, like "running"


def build_summary(tracker: RoundTracker, config: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    rounds = [record.to_dict() for record in tracker.rounds]
    final = dict(rounds[-1]) if rounds else None
    return {
        "config": config,
        "dp_enabled": tracker.dp_enabled,
        "rounds": rounds,
        "privacy": {org: dict(report) for org, report in sorted(tracker.privacy.items())},
        # what each organisation's node redacted before tokenisation: rule set and matches per kind (no values)
        "redaction": {org: dict(report) for org, report in sorted(tracker.redaction.items())},
        "final": final,
        **extra,
    }


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    path = run_dir / SUMMARY_FILE
    atomic_files.write_text(path, json.dumps(summary, indent=2, sort_keys=False) + "\n")
    return path


def write_metrics_csv(run_dir: Path, tracker: RoundTracker) -> Path:
    orgs = sorted({org for record in tracker.rounds for org in record.epsilon})
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(
        ["round", "accuracy", "macro_f1", "loss", "train_loss", "elapsed_s"] + [f"epsilon:{o}" for o in orgs]
    )
    for record in tracker.rounds:
        writer.writerow(
            [record.round, record.accuracy, record.macro_f1, record.loss, record.train_loss, round(record.elapsed_s, 3)]
            + [record.epsilon.get(org) for org in orgs]
        )
    return atomic_files.write_text(run_dir / METRICS_FILE, text.getvalue())


def mark_interrupted(run_dir: Path, signum: int) -> int:
    """Set ``summary.json``'s status to ``interrupted`` (unless the run had ended); the complete rounds.

    Fields are only added (``interrupted``: the signal, when, after which round). A summary that is missing
    (stopped in round 1) or unreadable is written from the resume point, which is what ``--resume`` reads.
    """
    from fedpriv.server.resume import ENDED, ResumeError, load_resume_point

    path = Path(run_dir) / SUMMARY_FILE
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(summary, dict):
            raise ValueError("not an object")
    except (OSError, UnicodeDecodeError, ValueError):
        summary = None
    if summary is not None and summary.get("status") in ENDED:
        return len(summary.get("rounds") or [])
    if summary is None:
        try:
            point = load_resume_point(run_dir)
            rounds, config = point.rounds, point.config
        except ResumeError:
            rounds, config = [], {}
        summary = {"run_dir": str(run_dir), "config": config, "rounds": rounds}
    done = len(summary.get("rounds") or [])
    summary["status"] = INTERRUPTED
    summary["interrupted"] = {
        "signal": signal.Signals(signum).name,
        "at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "after_round": done,
    }
    write_summary(Path(run_dir), summary)
    return done


def redaction_found(report: dict[str, Any]) -> str:
    """What one organisation's redaction report says was found: matches per kind, the kinds, or not shared."""
    if "counts" in report:
        return ", ".join(f"{kind} {n}" for kind, n in report["counts"].items() if n) or "nothing found"
    if "found" in report:
        found = ", ".join(report["found"]) or "nothing"
        return f"found {found} (kinds only: the organisation does not share how many)"
    return "what was found is not shared by the organisation"


def per_class_lines(final: dict[str, Any]) -> list[str]:
    """The last round's precision / recall / F1 per class (summary.json's ``per_class``), one line each."""
    rows = final.get("per_class")
    if not rows:
        return ["Per class: not shared by the organisations (privacy.share_per_class_eval)"]
    width = max(len(str(row["label"])) for row in rows)

    def fmt(value: float | None) -> str:
        return "  n/a" if value is None else f"{value:.3f}"

    lines = ["Per class (precision / recall / F1; test examples):"]
    for row in rows:
        lines.append(
            f"  {str(row['label']):<{width}}  {fmt(row['precision'])} / {fmt(row['recall'])} / {fmt(row['f1'])};"
            f" {row['support']}"
        )
    return lines


def final_report(summary: dict[str, Any]) -> str:
    final = summary.get("final") or {}
    lines = [
        "",
        f"Run {summary.get('status')}: {len(summary.get('rounds', []))} rounds in {summary.get('wall_time_s')} s",
    ]
    if final and final.get("accuracy") is not None:
        f1 = "not shared by the organisations" if final.get("macro_f1") is None else f"{final['macro_f1']:.3f}"
        lines.append(
            f"Global model: accuracy {final['accuracy']:.3f}, macro-F1 {f1},"
            f" loss {final['loss']:.3f} (on the organisations' own test data)"
        )
        lines += per_class_lines(final)
    if final and final.get("trained_orgs"):
        if final.get("train_loss") is None:
            lines.append("Mean training loss: not shared by the organisations (privacy.share_training_loss is off)")
        else:
            lines.append(
                f"Mean training loss (last round, outside the DP guarantee; sent by"
                f" {', '.join(final.get('train_loss_orgs') or final['trained_orgs'])}): {final['train_loss']:.3f}"
            )
    elif final:
        lines.append("Global model: not evaluated in the last round (no organisation answered; see the errors above)")
    if summary.get("dp_enabled"):
        lines.append("Privacy spent (epsilon at delta; target):")
        for org, p in summary.get("privacy", {}).items():
            lines.append(
                f"  {org}: epsilon {p['epsilon']:.3f} at delta {p['delta']:g} (target {p['target_epsilon']:g},"
                f" sigma {p['noise_multiplier']:.3f}, q {p['sample_rate']:.4f}, {p['steps']} steps)"
            )
    else:
        lines.append("DP was OFF: these results carry no privacy guarantee.")
    redacted = {org: r for org, r in (summary.get("redaction") or {}).items() if r.get("enabled")}
    if redacted:
        lines.append("Redacted before tokenisation (train + test; as each organisation shares it: redaction.share):")
        for org, report in redacted.items():
            lines.append(f"  {org}: {redaction_found(report)}")
    client_dp = summary.get("client_dp")
    if client_dp:
        lines.append(
            f"Organisation-level DP ({client_dp['clipping']} clipping, noise multiplier {client_dp['noise_multiplier']}):"
            f" epsilon {client_dp['epsilon']:.3f} at delta {client_dp['delta']:g} over {client_dp['rounds']} rounds"
            f" (budget {client_dp['max_epsilon']:g}); it protects {client_dp['protects']}"
        )
    budget = summary.get("budget") or {}
    if budget.get("stopped_reason"):
        lines.append(f"Stopped early: {budget['stopped_reason']}")
    run_dir = summary.get("run_dir", "")
    confusion = ", confusion.png" if final and final.get("confusion_matrix") else ""
    lines.append(f"Files: {run_dir}/summary.json, metrics.csv, progress.png{confusion}, model/")
    return "\n".join(lines)
