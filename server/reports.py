"""Run files people and programs read: summary.json, metrics.csv and a progress plot."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from server.round_tracker import RoundTracker

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.csv"
PLOT_FILE = "progress.png"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


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
    _write_atomic(path, json.dumps(summary, indent=2, sort_keys=False) + "\n")
    return path


def write_metrics_csv(run_dir: Path, tracker: RoundTracker) -> Path:
    orgs = sorted({org for record in tracker.rounds for org in record.epsilon})
    path = run_dir / METRICS_FILE
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["round", "accuracy", "macro_f1", "loss", "train_loss", "elapsed_s"] + [f"epsilon:{o}" for o in orgs]
        )
        for record in tracker.rounds:
            writer.writerow(
                [
                    record.round,
                    record.accuracy,
                    record.macro_f1,
                    record.loss,
                    record.train_loss,
                    round(record.elapsed_s, 3),
                ]
                + [record.epsilon.get(org) for org in orgs]
            )
    tmp.replace(path)
    return path


def write_plot(run_dir: Path, tracker: RoundTracker, targets: dict[str, float] | None = None) -> Path:
    """Accuracy / macro-F1 per round, and epsilon spent per organisation per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r.round for r in tracker.rounds]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(rounds, [r.accuracy for r in tracker.rounds], marker="o", label="accuracy")
    left.plot(rounds, [r.macro_f1 for r in tracker.rounds], marker="s", label="macro-F1")
    left.set(xlabel="round", ylabel="score", title="Global model on the organisations' test data", ylim=(0, 1))
    left.set_xticks(rounds)
    left.grid(alpha=0.3)
    left.legend()
    if tracker.dp_enabled:
        orgs = sorted({org for r in tracker.rounds for org in r.epsilon})
        for org in orgs:
            right.plot(rounds, [r.epsilon.get(org) for r in tracker.rounds], marker="o", label=org)
        for value in sorted(set((targets or {}).values())):
            right.axhline(value, linestyle="--", color="grey", linewidth=1)
        right.set(xlabel="round", ylabel="epsilon spent", title="Privacy spent per organisation (dashed: target)")
        right.set_xticks(rounds)
        right.set_ylim(bottom=0)
        right.legend(fontsize="small")
    else:
        right.text(0.5, 0.5, "DP OFF\nno privacy guarantee", ha="center", va="center", fontsize=16)
        right.set_axis_off()
    right.grid(alpha=0.3)
    fig.tight_layout()
    path = run_dir / PLOT_FILE
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
