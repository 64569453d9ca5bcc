"""Collects what each round produced and says it: metric aggregation, progress line, run files.

Flower's strategies call ``aggregate_train`` / ``aggregate_evaluate`` with the
reply contents (our per-organisation ``privacy`` / ``org`` ConfigRecords
included) and ``end_of_round`` as their ``evaluate_fn`` after every round.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedpriv.kernel import protocol
from fedpriv.shared_models.class_scores import macro_f1, per_class_scores

# Privacy fields every organisation's summary entry carries (null when DP is off).
NO_DP_FIELDS = ("epsilon", "delta", "target_epsilon", "noise_multiplier", "sample_rate", "steps")
# what human output says where an organisation did not send what a field needs (client/disclosures.py)
NOT_SHARED = "not shared by the organisations"


@dataclass
class RoundRecord:
    round: int
    accuracy: float | None = None
    macro_f1: float | None = None
    loss: float | None = None
    epsilon: dict[str, float | None] = field(default_factory=dict)
    # the example-weighted mean training loss over the organisations that sent theirs (privacy.share_training_loss,
    # off by default); None when none did. train_loss_orgs: those organisations
    train_loss: float | None = None
    train_loss_orgs: list[str] = field(default_factory=list)
    trained_orgs: list[str] = field(default_factory=list)
    org_accuracy: dict[str, float] = field(default_factory=dict)
    elapsed_s: float = 0.0
    # from the summed per-class counts (None when an organisation does not share them): precision, recall, F1 and
    # support per class, and confusion_matrix[true][predicted], both in the run's class order (label_names)
    per_class: list[dict[str, Any]] | None = None
    confusion_matrix: list[list[int]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "loss": self.loss,
            "epsilon": dict(self.epsilon),
            "train_loss": self.train_loss,
            "train_loss_orgs": list(self.train_loss_orgs),
            "trained_orgs": list(self.trained_orgs),
            "org_accuracy": dict(self.org_accuracy),
            "elapsed_s": round(self.elapsed_s, 3),
            "per_class": [dict(row) for row in self.per_class] if self.per_class is not None else None,
            "confusion_matrix": [list(row) for row in self.confusion_matrix]
            if self.confusion_matrix is not None
            else None,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RoundRecord:
        """Inverse of :meth:`to_dict` (a resumed run continues the records of the rounds before)."""
        return cls(**{key: raw[key] for key in cls.__dataclass_fields__ if key in raw})


def _weighted_mean(contents: list[RecordDict], key: str, weight_key: str) -> float | None:
    """The ``weight_key``-weighted mean of ``key`` over the replies that carry it; None when none does."""
    contents = [c for c in contents if key in c[protocol.METRICS]]
    if not contents:
        return None
    total = sum(float(c[protocol.METRICS][weight_key]) for c in contents)
    return sum(float(c[protocol.METRICS][key]) * float(c[protocol.METRICS][weight_key]) for c in contents) / max(
        total, 1.0
    )


def _summed_confusion(contents: list[RecordDict], num_labels: int) -> list[list[int]] | None:
    """confusion[true][predicted] summed over the replies; None unless every reply carries every cell."""
    cells = [(t, p, protocol.confusion_key(t, p)) for t in range(num_labels) for p in range(num_labels)]
    if not contents or not all(key in c[protocol.METRICS] for c in contents for _, _, key in cells):
        return None
    matrix = [[0] * num_labels for _ in range(num_labels)]
    for t, p, key in cells:
        matrix[t][p] = sum(int(c[protocol.METRICS][key]) for c in contents)
    return matrix


class RoundTracker:
    """Per-round records, the latest privacy report of every organisation, and the progress line."""

    def __init__(
        self,
        *,
        num_rounds: int,
        num_labels: int,
        dp_enabled: bool,
        on_round_end: Callable[[int, ArrayRecord], None] | None = None,
        printer: Callable[[str], None] = print,
        label_names: list[str] | None = None,
    ):
        self.num_rounds = num_rounds
        self.num_labels = num_labels
        self.label_names = list(label_names) if label_names is not None else [str(i) for i in range(num_labels)]
        self.dp_enabled = dp_enabled
        self.on_round_end = on_round_end
        self.printer = printer
        self.rounds: list[RoundRecord] = []
        self.privacy: dict[str, dict[str, Any]] = {}
        self.redaction: dict[str, dict[str, Any]] = {}  # each organisation's latest redaction report
        self._current: RoundRecord | None = None
        self._started = time.monotonic()
        self.resumed_after: int | None = None  # set by restore(): the rounds before it came from a resume point
        self.nodes_prepared = False  # set after a pre-flight (server/preflight.py): data loaded, noise planned

    def restore(
        self,
        rounds: list[dict[str, Any]],
        privacy: dict[str, dict[str, Any]],
        elapsed_s: float,
        redaction: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """Continue a run: its earlier rounds' records, privacy reports and elapsed time (from its resume point)."""
        self.rounds = [RoundRecord.from_dict(raw) for raw in rounds]
        self.privacy = {org: dict(report) for org, report in privacy.items()}
        self.redaction = {org: dict(report) for org, report in (redaction or {}).items()}
        self._started = time.monotonic() - elapsed_s
        self.resumed_after = len(self.rounds)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._started

    # -- hooks called by Flower's strategy ---------------------------------------------

    def _round(self) -> RoundRecord:
        if self._current is None:
            self._current = RoundRecord(round=len(self.rounds) + 1)
        return self._current

    def aggregate_train(self, contents: list[RecordDict], weight_key: str) -> MetricRecord:
        weight_key = protocol.NUM_EXAMPLES  # metrics are per example, whatever weights the strategy averages with
        record = self._round()
        for content in contents:
            org = self.note_privacy(content[protocol.PRIVACY])
            record.trained_orgs.append(org)
            if protocol.TRAIN_LOSS in content[protocol.METRICS]:
                record.train_loss_orgs.append(org)
        record.trained_orgs.sort()
        record.train_loss_orgs.sort()
        record.train_loss = _weighted_mean(contents, protocol.TRAIN_LOSS, weight_key)
        aggregated: dict[str, float | int] = {
            protocol.NUM_EXAMPLES: sum(int(c[protocol.METRICS][weight_key]) for c in contents)
        }
        if record.train_loss is not None:
            aggregated[protocol.TRAIN_LOSS] = record.train_loss
        return MetricRecord(aggregated)

    def aggregate_evaluate(self, contents: list[RecordDict], weight_key: str) -> MetricRecord:
        """Exact global metrics from summed counts (macro-F1 over the union of test sets)."""
        weight_key = protocol.NUM_EXAMPLES
        record = self._round()
        total = sum(int(c[protocol.METRICS][weight_key]) for c in contents)
        correct = sum(int(c[protocol.METRICS][protocol.EVAL_CORRECT]) for c in contents)
        loss_sum = sum(float(c[protocol.METRICS][protocol.EVAL_LOSS_SUM]) for c in contents)
        record.accuracy = correct / total if total else 0.0
        record.loss = loss_sum / total if total else 0.0
        # macro-F1 over the union of the test sets needs every organisation's per-class counts: one that does not
        # send them (privacy.share_per_class_eval: false) leaves it None, never a macro-F1 of the others alone
        keys = [protocol.class_count_key(kind, i) for kind in ("tp", "fp", "fn") for i in range(self.num_labels)]
        if all(key in c[protocol.METRICS] for c in contents for key in keys):
            sums = {
                kind: [
                    sum(float(c[protocol.METRICS][protocol.class_count_key(kind, i)]) for c in contents)
                    for i in range(self.num_labels)
                ]
                for kind in ("tp", "fp", "fn")
            }
            record.macro_f1 = macro_f1(sums["tp"], sums["fp"], sums["fn"])
            record.per_class = per_class_scores(self.label_names, sums["tp"], sums["fp"], sums["fn"])
        else:
            record.macro_f1 = record.per_class = None
        record.confusion_matrix = _summed_confusion(contents, self.num_labels)
        for content in contents:
            metrics = content[protocol.METRICS]
            org = str(content[protocol.ORG]["name"])
            self._note_redaction(org, content[protocol.ORG].get(protocol.REDACTION))
            n = int(metrics[weight_key])
            record.org_accuracy[org] = int(metrics[protocol.EVAL_CORRECT]) / n if n else 0.0
        aggregated = {"accuracy": record.accuracy, "loss": record.loss, weight_key: total}
        if record.macro_f1 is not None:
            aggregated["macro_f1"] = record.macro_f1
        return MetricRecord(aggregated)

    def note_privacy(self, privacy_record) -> str:
        """Keep an organisation's privacy report (a train reply's, or a diverged one's: its steps are spent too)."""
        report = dict(privacy_record)
        org = str(report.pop("org"))
        self._note_redaction(org, report.pop(protocol.REDACTION, None))
        if not report.get("dp_enabled"):
            report.update({key: None for key in NO_DP_FIELDS})
        self.privacy[org] = report
        return org

    def _note_redaction(self, org: str, report: Any) -> None:
        """Keep a node's redaction report (JSON); a malformed one is recorded as such, never dropped silently."""
        if report is None:
            return
        try:
            value = json.loads(str(report))
        except ValueError:
            value = None
        self.redaction[org] = value if isinstance(value, dict) else {"malformed": str(report)[:200]}

    def end_of_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's ``evaluate_fn``: runs after each round (and once before round 1)."""
        if server_round == 0:
            if self.nodes_prepared:
                first = self.resumed_after + 1 if self.resumed_after is not None else 1
                self.printer(f"training: rounds {first}..{self.num_rounds} ...")
            elif self.resumed_after is not None:
                self.printer(
                    f"resuming after round {self.resumed_after} of {self.num_rounds}: rounds"
                    f" {self.resumed_after + 1}..{self.num_rounds} to go; each node loads the model and its data ..."
                )
            else:
                self.printer(
                    f"training: {self.num_rounds} round(s); each node loads the model and its data in round 1 ..."
                )
            return None
        record = self._round()
        record.round = server_round
        record.elapsed_s = time.monotonic() - self._started
        record.epsilon = {org: report.get("epsilon") for org, report in sorted(self.privacy.items())}
        self.rounds.append(record)
        self._current = None
        if self.on_round_end is not None:
            self.on_round_end(server_round, arrays)
        self.printer(self.progress_line(record))
        return None

    # -- reporting ----------------------------------------------------------------------

    def progress_line(self, record: RoundRecord) -> str:
        def fmt(value: float | None, pattern: str = "{:.3f}") -> str:
            return "n/a" if value is None else pattern.format(value)

        minutes, seconds = divmod(int(record.elapsed_s), 60)
        if not record.trained_orgs:
            return (
                f"[round {record.round}/{self.num_rounds}]  NO organisation trained this round"
                " (every node failed or refused; see the errors above): the global model did not change"
            )
        parts = [
            f"[round {record.round}/{self.num_rounds}]",
            f"acc {fmt(record.accuracy)}",
            f"macro-F1 {NOT_SHARED}" if record.macro_f1 is None and record.accuracy is not None
            else f"macro-F1 {fmt(record.macro_f1)}",
            f"loss {fmt(record.loss)}",
        ]  # fmt: skip
        if self.dp_enabled:
            spent = {org: eps for org, eps in record.epsilon.items() if eps is not None}
            worst = max(spent.values()) if spent else 0.0
            per_org = ", ".join(f"{org} {eps:.2f}" for org, eps in spent.items())
            parts.append(f"eps max {worst:.2f} ({per_org})")
        else:
            parts.append("eps: DP OFF (no privacy guarantee)")
        parts.append(f"elapsed {minutes}m{seconds:02d}s")
        return "  ".join(parts)
