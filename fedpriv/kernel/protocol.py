"""Names of the records and keys exchanged between the ServerApp and the ClientApp."""

# Records in a message's RecordDict
ARRAYS = "arrays"  # ArrayRecord: trainable weights only
CONFIG = "config"  # ConfigRecord sent by the server
METRICS = "metrics"  # MetricRecord in replies (exactly one, as Flower's strategies require)
PRIVACY = "privacy"  # ConfigRecord in train replies: the organisation's privacy spent so far
ORG = "org"  # ConfigRecord in evaluate replies: which organisation answered
LEDGER = "ledger"  # ConfigRecord in replies: the node's new signed ledger entries and its budget outlook
# in the train reply's privacy record and the evaluate reply's org record: JSON of what the node's redaction did
# (its rule set and the matches replaced per kind, never the values; {"enabled": false} when off)
REDACTION = "redaction"
REFUSAL = "refusal"  # ConfigRecord in a train reply that declines to train (budget): no arrays, no DP step
# ConfigRecord in a train reply whose local training stopped on a non-finite loss or update: no arrays leave
DIVERGED = "diverged"
READY = "ready"  # ConfigRecord in a pre-flight (query) reply: the node's data sizes and privacy plan

# Keys of the server's ConfigRecord
SERVER_ROUND = "server-round"  # set by Flower's strategies
RUN_DIR = "run-dir"  # where simulated nodes keep their state when node_config has no state-dir
BASE_DIGEST = "base-digest"  # SHA-256 of the frozen base model every party must share
PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx
LEDGER_HEADS = "ledger-heads"  # JSON {org: seq}: the ledger entries the coordinator already holds

# Keys of the LEDGER record
LEDGER_ORG = "org"
LEDGER_PUBLIC_KEY = "public-key"  # PEM Ed25519 key that signs the entries
LEDGER_ENTRIES = "entries"  # JSON array of the entries after the coordinator's head
LEDGER_EPSILON = "epsilon"  # spent so far (the node's accountant)
LEDGER_EPSILON_NEXT = "epsilon-next"  # after one more round as configured
LEDGER_MAX_EPSILON = "max-epsilon"  # the organisation's hard budget
LEDGER_CAN_TRAIN = "can-train"  # whether one more round fits in the budget

# Keys of the READY record (the pre-flight reply; privacy keys only when DP is on)
READY_ORG = "org"
READY_TRAIN = "train-examples"
READY_TEST = "test-examples"
READY_NOISE = "noise-multiplier"
READY_SAMPLE_RATE = "sample-rate"
READY_PLANNED_STEPS = "planned-steps"  # DP steps the whole run as configured takes
READY_TARGET_EPSILON = "target-epsilon"
READY_DELTA = "delta"
READY_EPSILON = "epsilon"  # spent so far (the node's accountant)
READY_MAX_EPSILON = "max-epsilon"  # the organisation's hard budget
READY_MAX_LENGTH = "max-length"  # the tokens per text the node cuts its texts to (its data.max_length)

# Keys of reply MetricRecords
NUM_EXAMPLES = "num-examples"  # Flower's default weighting key
TRAIN_LOSS = "train-loss"
DP_STEPS = "dp-steps"
UNIT_WEIGHT = "unit-weight"  # 1 in every train reply: equal weights for organisation-level DP
EVAL_LOSS_SUM = "loss-sum"
EVAL_CORRECT = "correct"


def class_count_key(kind: str, label_index: int) -> str:
    """Per-class confusion counts in evaluate replies: ``tp-0``, ``fp-0``, ``fn-0`` ..."""
    return f"{kind}-{label_index}"


def confusion_key(true_index: int, predicted_index: int) -> str:
    """A confusion-matrix cell in evaluate replies: ``cm-1-2`` counts test examples of class 1 predicted as 2."""
    return f"cm-{true_index}-{predicted_index}"


# node_config keys (simulation sets partition-id / num-partitions itself)
NODE_PARTITION_ID = "partition-id"
NODE_CONFIG_FILE = "node-config"  # deployment: path of the organisation's node.yaml


def message_round(message) -> str:
    """The server round a message belongs to: its group id (the legacy and SecAgg+ workflows set it), else the
    ``server-round`` of its config record (Flower's message-API strategies); "" when it carries neither."""
    if message.metadata.group_id:
        return str(message.metadata.group_id)
    if message.has_content():
        for record in message.content.config_records.values():
            if SERVER_ROUND in record:
                return str(record[SERVER_ROUND])
    return ""


def message_stage(message) -> str:
    """``secagg:<stage>`` for a SecAgg+ stage's message, else its message type (``train``, ``evaluate``)."""
    configs = message.content.config_records.get("secaggplus_configs") if message.has_content() else None
    if configs is not None and "stage" in configs:
        return f"secagg:{configs['stage']}"
    return str(message.metadata.message_type)
