"""Names of the records and keys exchanged between the ServerApp and the ClientApp."""

# Records in a message's RecordDict
ARRAYS = "arrays"  # ArrayRecord: trainable weights only
CONFIG = "config"  # ConfigRecord sent by the server
METRICS = "metrics"  # MetricRecord in replies (exactly one, as Flower's strategies require)
PRIVACY = "privacy"  # ConfigRecord in train replies: the organisation's privacy spent so far
ORG = "org"  # ConfigRecord in evaluate replies: which organisation answered

# Keys of the server's ConfigRecord
SERVER_ROUND = "server-round"  # set by Flower's strategies
RUN_DIR = "run-dir"  # where simulated nodes keep their state when node_config has no state-dir
BASE_DIGEST = "base-digest"  # SHA-256 of the frozen base model every party must share
PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx

# Keys of reply MetricRecords
NUM_EXAMPLES = "num-examples"  # Flower's default weighting key
TRAIN_LOSS = "train-loss"
DP_STEPS = "dp-steps"
EVAL_LOSS_SUM = "loss-sum"
EVAL_CORRECT = "correct"


def class_count_key(kind: str, label_index: int) -> str:
    """Per-class confusion counts in evaluate replies: ``tp-0``, ``fp-0``, ``fn-0`` ..."""
    return f"{kind}-{label_index}"


# node_config keys (simulation sets partition-id / num-partitions itself)
NODE_PARTITION_ID = "partition-id"
NODE_CONFIG_FILE = "node-config"  # deployment: path of the organisation's node.yaml
