"""Everything a node sends, declared: for each message kind, each field, what it is computed on, whether the
organisation's DP accounting covers it, why it is acceptable, and which setting controls it.

The declaration is data (``MESSAGES``), read by three things: the test that scans every reply of a short
simulation and every ledger entry the coordinator keeps (a field not declared here fails
tests/simulations/test_disclosures_end_to_end.py), the "What leaves a node" table of docs/threat-model.md (``render_markdown``; a test
fails when the two differ: ``python -m fedpriv.client.disclosures --write`` rewrites the table) and the node itself,
which shares what its organisation allows (``Sharing``, from node.yaml in deployment and from the run config
in a simulation). No torch here: the coordinator's side and the docs test import it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fedpriv.kernel import protocol


@dataclass(frozen=True)
class Sharing:
    """What the organisation lets its node send beside its DP-trained update (its own settings)."""

    training_loss: bool = False  # privacy.share_training_loss
    per_class_eval: bool = True  # privacy.share_per_class_eval
    redaction: str = "kinds"  # redaction.share: kinds | counts | none

    @classmethod
    def from_run_config(cls, cfg) -> Sharing:
        """A simulation: the run config decides for every virtual organisation."""
        return cls(cfg.privacy.share_training_loss, cfg.privacy.share_per_class_eval, cfg.redaction.share)

    @classmethod
    def from_node_config(cls, node) -> Sharing:
        """Deployment: the organisation's own node.yaml decides (the coordinator's run config cannot)."""
        return cls(node.privacy.share_training_loss, node.privacy.share_per_class_eval, node.redaction.share)


def shared_redaction(spec: dict[str, Any], counts: dict[str, int], share: str) -> dict[str, Any]:
    """The redaction report that leaves the node: the rule set (``spec``) and, as ``share`` allows, which kinds
    were found (``found``, sorted) or how many matches per kind (``counts``); ``share`` says which."""
    report = {**spec, "share": share}
    if share == "counts":
        report["counts"] = dict(counts)
    elif share == "kinds":
        report["found"] = sorted(kind for kind, n in counts.items() if n)
    return report


# --------------------------------------------------------------------------- the declaration

# whether the organisation's DP accounting covers a field
DP_YES = "yes"  # computed from the training data through DP-SGD (clipped, noised, accounted)
DP_NO = "no: exact"  # computed from the organisation's data without noise: outside its DP guarantee
DP_NOT_DATA = "not data"  # settings, budgets, identities, hashes or values derived from them and the data sizes
DP_SIZES = "no: exact size"  # the sizes of the organisation's data sets


@dataclass(frozen=True)
class Field:
    """One key (or a family: ``<class>`` stands for a class index, ``<tensor>`` for a trainable tensor's name,
    ``<key>`` for any key of a nested record declared elsewhere) and what it discloses."""

    keys: tuple[str, ...]
    computed_on: str
    dp: str
    why: str
    setting: str = "always sent"

    def matches(self, key: str) -> bool:
        return any(_pattern(k).fullmatch(key) for k in self.keys)


def _pattern(key: str) -> re.Pattern:
    return re.compile(
        re.escape(key)
        .replace(re.escape("<class>"), "[0-9]+")
        .replace(re.escape("<tensor>"), "[^ ]+")
        .replace(re.escape("<key>"), "[^ ]+")
    )


@dataclass(frozen=True)
class Message:
    """One kind of thing a node sends, and where its fields are (``record`` -> fields; "" for flat data)."""

    name: str
    when: str
    records: dict[str, tuple[Field, ...]]

    def field(self, record: str, key: str) -> Field | None:
        return next((f for f in self.records.get(record, ()) if f.matches(key)), None)


_LOSS_SETTING = "privacy.share_training_loss (default false; node.yaml in deployment, the run config in a simulation)"
_CLASS_SETTING = "privacy.share_per_class_eval (default true; node.yaml in deployment, the run config in a simulation)"
_REDACTION_SETTING = "redaction.share: kinds (default) | counts | none (node.yaml; the run config in a simulation)"

ORG_NAME = Field(
    ("org",), "the organisation's name", DP_NOT_DATA, "who answered: the coordinator routes and records by it"
)
PUBLIC_KEY_FIELDS = (
    Field((protocol.LEDGER_ORG,), "the organisation's name", DP_NOT_DATA, "whose ledger this is"),
    Field(
        (protocol.LEDGER_PUBLIC_KEY,),
        "the organisation's Ed25519 ledger key (public half)",
        DP_NOT_DATA,
        "lets the coordinator and an auditor verify the signed entries",
    ),
    Field(
        (protocol.LEDGER_ENTRIES,),
        "the node's new signed ledger entries (see 'ledger entry' below)",
        "see 'ledger entry'",
        "the coordinator keeps a verifiable copy of every organisation's spending",
    ),
    Field(
        (protocol.LEDGER_EPSILON, protocol.LEDGER_EPSILON_NEXT, protocol.LEDGER_MAX_EPSILON, protocol.LEDGER_CAN_TRAIN),
        "the node's accountant: epsilon spent, after one more round, its budget, whether a round still fits",
        DP_NOT_DATA,
        "derived from the noise, sampling rate and steps only; the coordinator plans rounds with it",
    ),
)
PRIVACY_REPORT = (
    ORG_NAME,
    Field(("dp_enabled",), "the run's settings", DP_NOT_DATA, "whether the update is DP-trained at all"),
    Field(
        (
            "epsilon",
            "delta",
            "target_epsilon",
            "noise_multiplier",
            "sample_rate",
            "steps",
            "planned_steps",
            "accountant",
            "max_grad_norm",
            "max_epsilon",
            "clipping_mode",
        ),
        "the node's privacy plan and accountant (budget, noise, batch size / training-set size, steps)",
        DP_NOT_DATA,
        "the privacy claim must be checkable; the sampling rate reveals the training-set size (see num-examples)",
    ),
    Field(
        (protocol.REDACTION,),
        "JSON: the node's redaction report (see 'redaction report' below)",
        "see 'redaction report'",
        "the model card and the audit say which rules the data went through",
        _REDACTION_SETTING,
    ),
)
NUM_EXAMPLES_TRAIN = Field(
    (protocol.NUM_EXAMPLES,),
    "the size of the node's training split",
    DP_SIZES,
    "example-weighted averaging; already public through the sampling rate q = batch size / examples",
)

TRAIN_REPLY = Message(
    "train reply",
    "every round the node trains (Flower message type train)",
    {
        protocol.ARRAYS: (
            Field(
                ("<tensor>",),
                "the trainable part of the model (LoRA adapters + classification head) after local training",
                DP_YES,
                "the point of federated training: DP-SGD (per-example clipping, Gaussian noise) covers it",
            ),
        ),
        protocol.METRICS: (
            NUM_EXAMPLES_TRAIN,
            Field(
                (protocol.TRAIN_LOSS,),
                "the mean loss over the round's training batches, before clipping and noise",
                DP_NO,
                "progress display only; off unless the organisation turns it on",
                _LOSS_SETTING,
            ),
            Field((protocol.DP_STEPS,), "the steps this round took", DP_NOT_DATA, "accounting: also in the ledger"),
            Field((protocol.UNIT_WEIGHT,), "the constant 1", DP_NOT_DATA, "equal weights for organisation-level DP"),
        ),
        protocol.PRIVACY: PRIVACY_REPORT,
        protocol.LEDGER: PUBLIC_KEY_FIELDS,
        protocol.DIVERGED: (
            ORG_NAME,
            Field(
                ("reason", "step", "kind"),
                "why local training stopped: a non-finite loss (nan/inf), a float32 overflow or non-finite weights,"
                " at which step, and the round's learning rate",
                DP_NO,
                "the run stops with one line naming the round and the organisation; the weights never leave",
            ),
        ),
        protocol.REFUSAL: (
            ORG_NAME,
            Field(
                ("reason", "epsilon", "epsilon-if-trained", "max-epsilon"),
                "the node's accountant and budget",
                DP_NOT_DATA,
                "why the node declines a round (nothing spent, recorded in its ledger)",
            ),
        ),
    },
)

EVALUATE_REPLY = Message(
    "evaluate reply",
    "every round (Flower message type evaluate), on the global model",
    {
        protocol.METRICS: (
            Field(
                (protocol.NUM_EXAMPLES,),
                "the size of the node's test split",
                DP_SIZES,
                "example-weighted metrics; the test split is held out and never trained on",
            ),
            Field(
                (protocol.EVAL_LOSS_SUM, protocol.EVAL_CORRECT),
                "the global model's summed loss and correct predictions on the node's test split",
                DP_NO,
                "federated evaluation (accuracy, loss): test examples are never trained on, so the update's DP"
                " guarantee does not cover them either way; one number each over the whole split",
            ),
            Field(
                ("tp-<class>", "fp-<class>", "fn-<class>"),
                "per class: true positives, false positives, false negatives on the node's test split",
                DP_NO,
                "the run's exact macro-F1 and per-class precision / recall / F1; they reveal the test split's label"
                " counts. Off: macro-F1 and per_class are null",
                _CLASS_SETTING,
            ),
            Field(
                ("cm-<class>-<class>",),
                "the confusion matrix: test examples of the first class the global model predicted as the second",
                DP_NO,
                "the run's confusion matrix (summary.json, confusion.png): which class is mistaken for which;"
                " beside the counts above it adds how each class's errors split over the others. Off with the"
                " counts above: confusion_matrix is null",
                _CLASS_SETTING,
            ),
            Field((protocol.UNIT_WEIGHT,), "the constant 1", DP_NOT_DATA, "equal weights for organisation-level DP"),
        ),
        protocol.ORG: (
            Field(("name",), "the organisation's name", DP_NOT_DATA, "who answered"),
            Field(
                (protocol.REDACTION,),
                "JSON: the node's redaction report (see 'redaction report' below)",
                "see 'redaction report'",
                "the same report as in train replies (a node that never trained still says it)",
                _REDACTION_SETTING,
            ),
        ),
        protocol.LEDGER: PUBLIC_KEY_FIELDS,
    },
)

QUERY_REPLY = Message(
    "pre-flight reply",
    "once before round 1 when the coordinator asks (Flower message type query; strategy.preflight)",
    {
        protocol.READY: (
            Field((protocol.READY_ORG,), "the organisation's name", DP_NOT_DATA, "who answered"),
            Field(
                (protocol.READY_TRAIN, protocol.READY_TEST),
                "the sizes of the node's training and test splits",
                DP_SIZES,
                "the coordinator checks that every node can train before round 1 (also sent with every round)",
            ),
            Field(
                (protocol.READY_MAX_LENGTH,),
                "the node's data.max_length: the tokens per text it cuts its texts to",
                DP_NOT_DATA,
                "the exported model records what it was trained at, so that prediction cuts texts the same way",
            ),
            Field(
                (
                    protocol.READY_NOISE,
                    protocol.READY_SAMPLE_RATE,
                    protocol.READY_PLANNED_STEPS,
                    protocol.READY_TARGET_EPSILON,
                    protocol.READY_DELTA,
                    protocol.READY_EPSILON,
                    protocol.READY_MAX_EPSILON,
                ),
                "the node's privacy plan and accountant",
                DP_NOT_DATA,
                "the coordinator shows each organisation's plan and spending before any round",
            ),
        ),
    },
)

SECAGG_REPLIES = Message(
    "SecAgg+ replies",
    "with secure_aggregation.enabled: Flower's legacy fit / evaluate records and the SecAgg+ stages",
    {
        "fitres.*, evaluateres.*": (
            Field(
                ("<key>",),
                "the train and evaluate replies above, flattened into Flower's legacy records (privacy.*, ledger.*,"
                " org.name, org.redaction beside the metrics)",
                "as above",
                "SecAgg+ speaks only the legacy records; the same settings apply",
                "as above",
            ),
        ),
        "secaggplus_configs": (
            Field(
                ("<key>",),
                "Flower's SecAgg+ protocol: public keys, encrypted key shares, the masked update, shares for unmasking",
                DP_YES + " (the masked update); the rest: not data",
                "the coordinator sees only the sum of the (DP-trained) updates",
            ),
        ),
    },
)

REDACTION_REPORT = Message(
    "redaction report",
    "JSON inside privacy.redaction, org.redaction and each dp_round ledger entry; in summary.json's redaction",
    {
        "": (
            Field(("enabled",), "the node's redaction setting", DP_NOT_DATA, "whether the text was redacted"),
            Field(
                ("rules", "version", "engine", "kinds", "locales", "min_score", "extra_names", "digest"),
                "the rule set (extra_names: whether the organisation's own names file was used, never the names)",
                DP_NOT_DATA,
                "prediction must apply the same rules (the model card); the audit checks them",
            ),
            Field(("share",), "the organisation's redaction.share", DP_NOT_DATA, "says which of the next two follow"),
            Field(
                ("found",),
                "the kinds with at least one match in the node's train + test text (share: kinds)",
                DP_NO + " (presence only)",
                "the model card and audit say what kinds of personal data the rules met, not how much",
                _REDACTION_SETTING,
            ),
            Field(
                ("counts",),
                "matches replaced per kind in the node's train + test text (share: counts)",
                DP_NO,
                "only where the organisation chooses it",
                _REDACTION_SETTING,
            ),
        ),
    },
)

LEDGER_ENTRY = Message(
    "ledger entry",
    "signed by the node, sent in the ledger record's entries; the coordinator keeps them in ledgers/ORG.jsonl",
    {
        "": (
            Field(
                ("format", "org", "seq", "kind", "round", "time", "prev_hash", "signature"),
                "the chain: organisation, position, kind, round, time, previous entry's hash, Ed25519 signature",
                DP_NOT_DATA,
                "an auditor can tell an intact ledger from an edited one",
            ),
            Field(
                (
                    "local_steps",
                    "sample_rate",
                    "noise_multiplier",
                    "max_grad_norm",
                    "delta",
                    "accountant",
                    "epsilon",
                    "target_epsilon",
                    "max_epsilon",
                    "model_digest",
                ),
                "the DP event: steps, sampling rate, noise, clipping, accountant, budget; the global model's hash",
                DP_NOT_DATA,
                "an auditor recomputes epsilon from them alone",
            ),
            Field(("num_examples",), "the size of the node's training split", DP_SIZES, "as in the train reply"),
            Field(
                ("local_epochs",),
                "the local epochs the round's steps make (the run config's training.local_epochs)",
                DP_NOT_DATA,
                "an auditor checks the steps are that many whole epochs",
            ),
            Field(
                ("stopped",),
                "'diverged' when the round stopped early on a non-finite loss or update (its local_steps: those taken)",
                DP_NO,
                "the steps taken before it are spent and must be accounted; the stop itself depends on the data",
            ),
            Field(
                ("redaction",),
                "the node's redaction report (see 'redaction report'), as its organisation allows",
                "see 'redaction report'",
                "which rules the data these steps saw went through",
                _REDACTION_SETTING,
            ),
            Field(
                ("reason", "requested_steps", "epsilon_if_trained"),
                "a refusal: the accountant and the budget",
                DP_NOT_DATA,
                "why the node declined a round",
            ),
        ),
    },
)

COORDINATOR_FILES = Message(
    "coordinator's per-node files",
    "what the coordinator writes per organisation in the run folder, from the messages above only",
    {
        "ledgers/<org>.jsonl": (
            Field(("<key>",), "the organisation's signed ledger entries, as sent", "see 'ledger entry'", "audit"),
        ),
        "ledgers/keys/<org>.pub": (
            Field(("<key>",), "the organisation's ledger public key, as sent", DP_NOT_DATA, "audit"),
        ),
        "summary.json": (
            Field(
                (
                    "privacy.<org>",
                    "redaction.<org>",
                    "preflight.ready",
                    "rounds[].org_accuracy",
                    "rounds[].trained_orgs",
                    "rounds[].epsilon",
                    "rounds[].per_class",
                    "rounds[].confusion_matrix",
                    "budget.refusals",
                ),
                "the privacy report, redaction report, pre-flight reply, correct / test examples per organisation;"
                " per-class scores and the confusion matrix summed over the organisations",
                "as in the replies",
                "the run's record; nothing a node did not send",
            ),
        ),
    },
)

ERROR_REPLY = Message(
    "error reply",
    "instead of a train / evaluate / pre-flight reply, when the node cannot or will not take part",
    {
        "error": (
            Field(
                ("code", "reason"),
                "the node's one-line reason: a refusal (budget exhausted, no DP allowed, base model differs, app not"
                " approved), a setup error naming a file, a setting or a count, or a disk error naming the state"
                " file it could not write and the errno",
                DP_NOT_DATA,
                "the coordinator must know why a node did not train; the reason names settings, budgets, hashes"
                " and data-set sizes, never records",
            ),
        ),
    },
)

TRANSPORT = Message(
    "every message",
    "Flower's envelope and the connection",
    {
        "metadata": (
            Field(
                ("<key>",),
                "the SuperNode's id and public key, the run, message ids and type, timing and size",
                DP_NOT_DATA,
                "identity and transport (TLS on every link)",
            ),
        ),
    },
)

MESSAGES: tuple[Message, ...] = (
    TRAIN_REPLY,
    EVALUATE_REPLY,
    QUERY_REPLY,
    ERROR_REPLY,
    SECAGG_REPLIES,
    REDACTION_REPORT,
    LEDGER_ENTRY,
    COORDINATOR_FILES,
    TRANSPORT,
)
REPLIES = {"train": TRAIN_REPLY, "evaluate": EVALUATE_REPLY, "query": QUERY_REPLY}


def undeclared(message: Message, content: dict[str, dict[str, Any]]) -> list[str]:
    """``record.key`` of every field in ``content`` ({record: {key: value}}) that ``message`` does not declare."""
    missing = []
    for record, values in content.items():
        if record not in message.records:
            missing.append(f"{record} (record)")
            continue
        missing += [f"{record}.{key}" if record else key for key in values if message.field(record, key) is None]
    return missing


# --------------------------------------------------------------------------- the table in docs/threat-model.md

TABLE_BEGIN = "<!-- disclosures: generated from client/disclosures.py; python -m fedpriv.client.disclosures --write -->"
TABLE_END = "<!-- /disclosures -->"


def render_markdown() -> str:
    """The "What leaves a node" table: one row per declared field (family), grouped by message."""
    lines = [
        "| message | record | fields | computed on | covered by the node's DP accounting | why it is acceptable |"
        " controlled by |",
        "|---|---|---|---|---|---|---|",
    ]
    for message in MESSAGES:
        first = True
        for record, fields in message.records.items():
            for f in fields:
                cells = [
                    f"**{message.name}** ({message.when})" if first else "",
                    f"`{record}`" if record else "",
                    ", ".join(f"`{key}`" for key in f.keys),
                    f.computed_on,
                    f.dp,
                    f.why,
                    f.setting,
                ]
                lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
                first = False
    return "\n".join(lines)


def table_block() -> str:
    return f"{TABLE_BEGIN}\n{render_markdown()}\n{TABLE_END}"


def replace_table(text: str) -> str:
    """``text`` (docs/threat-model.md) with its generated block replaced by today's declaration."""
    start, end = text.index(TABLE_BEGIN), text.index(TABLE_END) + len(TABLE_END)
    return text[:start] + table_block() + text[end:]


def main(argv: list[str] | None = None) -> int:
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(description="Print (or --write into docs/threat-model.md) the table")
    parser.add_argument("--write", nargs="?", const="docs/threat-model.md", default=None)
    args = parser.parse_args(argv)
    if args.write is None:
        print(render_markdown())
        return 0
    path = Path(args.write)
    path.write_text(replace_table(path.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
