"""Run files people and programs read: summary.json and metrics.csv (the plot: server/progress_plot.py)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from fedpriv.server.round_tracker import RoundTracker

from fedpriv.kernel import atomic_files

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.csv"


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
