"""Real Flower messages and contexts for calling the ClientApp's handlers in-process (no SuperNode, no Ray).

Tests that use them need the ``flower_task_identity`` fixture (tests/conftest.py): Flower's ``Message`` reads
the run, node and task ids its runtime would have set.
"""

from __future__ import annotations

# two IID organisations of the tiny model, two rounds: a node's whole planned participation in a few seconds
HANDLER_RUN = [
    "model.name=tiny",
    "training.rounds=2",
    "partitioning.num_orgs=2",
    "partitioning.scheme=iid",
    "data.max_examples=120",
    "training.batch_size=16",
    "data.max_length=32",
]


def node_message(cfg, run_dir, server_round, message_type="train", digest=None):
    """What the coordinator sends a node for ``server_round``: the global trainable weights and its config."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedpriv.client.node import fresh_model
    from fedpriv.data.partitioning import plan_partitions
    from fedpriv.kernel import protocol
    from fedpriv.shared_models.weights import trainable_arrays

    model, base_digest = fresh_model(cfg.model, plan_partitions(cfg).label_names)
    config = ConfigRecord(
        {
            protocol.SERVER_ROUND: server_round,
            protocol.RUN_DIR: str(run_dir),
            protocol.BASE_DIGEST: digest or base_digest,
        }
    )
    content = RecordDict({protocol.ARRAYS: trainable_arrays(model), protocol.CONFIG: config})
    return Message(content=content, dst_node_id=1, message_type=message_type)


def partition_context(partition_id=0):
    """A simulated node's Context: organisation ``partition_id`` of two."""
    from flwr.app import Context, RecordDict

    node_config = {"partition-id": partition_id, "num-partitions": 2}
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
