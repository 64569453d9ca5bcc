"""What one organisation uploads per round, in bytes, against the size of the full fp32 model.

Issue goal: bytes a node uploads per round / full fp32 model size <= 0.5%.

Nothing here is a formula. For every model and fine-tuning mode the organisation's real ClientApp
(``fedpriv.client.client_app.build_client_app``, with its mods) answers the messages a coordinator sends in one
round: it trains one round with DP-SGD on a small IID partition of BBC News (so its reply carries its
metrics, its privacy report and its signed ledger entry), then evaluates. Each reply ``Message`` is sized
the way a Flower 1.41 SuperNode ships it to the SuperLink: the message (content removed) and its object
tree in one ``PushMessagesRequest``, then one ``PushObjectRequest`` per object of the message (Message,
RecordDict, records, Arrays and their <= 5 MiB ArrayChunks, each deflated by Flower itself; identical
objects once). Bytes are those protobuf requests' serialized sizes (gRPC/HTTP/TLS framing not counted).

Plain path: the replies to one train and one evaluate message. SecAgg+ path (for the fine-tuning
modes listed in ``secagg``; ``none`` for none): three organisations (``secure_aggregation`` defaults:
every node holds a share, threshold 2) run Flower's own ``secaggplus_mod`` through the same ClientApp for
all four stages (setup, share keys, collect masked vectors, unmask), then one legacy evaluate; the
measured node's five replies are sized. In the collect stage the mod produces the trainable vector
quantised and masked as int64 arrays (``ndarray_to_bytes``) inside a ConfigRecord, whatever the modulus
(the workflow's default 2**32); the ClientApp packs them into uint32 before they leave the node
(fedpriv/runtime/masked_vectors.py), and the coordinator widens them back for Flower's workflow.

"Full fp32 model" is every parameter of the base model (what ``model.finetuning=full`` builds, frozen
embeddings included) x 4 bytes; the same denominator for LoRA and full fine-tuning. LoRA settings (rank,
target modules) are the packaged defaults; ``finetuning=lora-frozen-a`` is LoRA with ``model.lora.freeze_a``
(only the B matrices and the head travel). Round 1 is measured: the coordinator holds none of the node's
ledger entries, so the train reply carries one entry, as in every later round. One torch thread.

    python benchmarks/communication.py                          # minilm and tiny, LoRA and full, with SecAgg+
    python benchmarks/communication.py models=tiny secagg=lora  # the smoke test's setting
    python benchmarks/communication.py models=minilm finetuning=lora out=/tmp/communication.json
    python benchmarks/communication.py models=minilm finetuning=lora,lora-frozen-a secagg=lora,lora-frozen-a

Prints one JSON line (and writes it to ``out`` when given).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from benchmark_settings import parse_settings

DEFAULTS = {
    "models": "minilm,tiny", "finetuning": "lora,full", "examples": 80, "batch": 8, "max_length": 32,
    "secagg": "lora,full", "out": "",
}  # fmt: skip
MODELS = ("minilm", "tiny")
MODE_OVERRIDES = {  # each update kind measured, as model.* overrides
    "lora": ["model.finetuning=lora"],
    "full": ["model.finetuning=full"],
    "lora-frozen-a": ["model.finetuning=lora", "model.lora.freeze_a=true"],  # B matrices + head travel
}
MODES = tuple(MODE_OVERRIDES)
GOAL = 0.005  # the target: at most 0.5% of the full fp32 model per node and round

# Identities as a deployment has them: SuperNode and run ids are random 64-bit integers, sessions uuid4 text.
RUN_ID = 0x5DEECE66D2B7E151
NODE_IDS = (0x9E3779B97F4A7C15, 0x9E3779B97F4A7C16, 0x9E3779B97F4A7C17)  # the first one is measured
SESSION_ID = "1b4e28ba-2fa1-41d2-883f-0016d3cca427"


def parse(argv: list[str]) -> dict:
    args = parse_settings(argv, DEFAULTS)
    for key, known in (("models", MODELS), ("finetuning", MODES), ("secagg", (*MODES, "none"))):
        unknown = [item for item in args[key].split(",") if item not in known]
        if unknown:
            raise SystemExit(f"{key}: unknown {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    return args


def settings(model: str, finetuning: str, args: dict, num_orgs: int):
    from fedpriv.kernel.config import load_config

    return load_config(
        overrides=[
            f"model.name={model}",
            *MODE_OVERRIDES[finetuning],
            "partitioning.scheme=iid",
            f"partitioning.num_orgs={num_orgs}",
            f"data.max_examples={args['examples']}",
            f"data.max_length={args['max_length']}",
            f"training.batch_size={args['batch']}",
            "training.local_epochs=1",
            "training.device=cpu",
        ]
    )


def _with_id(message):
    """Give a message the id Flower gives it (its object id), as the SuperLink / SuperNode runtime does."""
    message.metadata.__dict__["_message_id"] = message.object_id
    return message


def upload_bytes(reply) -> dict:
    """Serialized size of what a SuperNode sends to the SuperLink for ``reply`` (Fleet API requests)."""
    from flwr.app.message import remove_content_from_message
    from flwr.common.serde import message_to_proto
    from flwr.proto.fleet_pb2 import PushMessagesRequest
    from flwr.proto.message_pb2 import PushObjectRequest
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.inflatable.inflatable_object import (
        get_all_nested_objects,
        get_object_tree,
        no_object_id_recompute,
    )

    if reply.has_error():
        raise RuntimeError(f"the ClientApp replied with an error: {reply.error.reason}")
    _with_id(reply)
    node = Node(node_id=reply.metadata.src_node_id)
    with no_object_id_recompute():  # as Flower's push_message: each object's id is hashed once
        tree = get_object_tree(reply)
        objects = get_all_nested_objects(reply)  # object id -> object; an object sent twice is pushed once
    contents = {object_id: obj.deflate() for object_id, obj in objects.items()}
    head = PushMessagesRequest(
        node=node,
        messages_list=[message_to_proto(remove_content_from_message(reply))],
        message_object_trees=[tree],
        clientapp_runtime_list=[1.0],
    ).ByteSize()
    pushed = sum(
        PushObjectRequest(
            node=node, run_id=RUN_ID, object_id=object_id, object_content=content, session_id=SESSION_ID
        ).ByteSize()
        for object_id, content in contents.items()
    )
    return {"bytes": head + pushed, "objects": len(contents), "object_bytes": sum(map(len, contents.values()))}


def _server_message(content, node_id: int, message_type: str):
    from flwr.app import Message

    return _with_id(Message(content=content, dst_node_id=node_id, message_type=message_type, group_id="1"))


def _context(node_id: int, partition_id: int, num_orgs: int):
    from flwr.app import Context, RecordDict

    node_config = {"partition-id": partition_id, "num-partitions": num_orgs}
    return Context(run_id=RUN_ID, node_id=node_id, node_config=node_config, state=RecordDict(), run_config={})


def _server_config(run_dir: Path, digest: str, heads: dict) -> dict:
    from fedpriv.kernel import protocol

    return {
        protocol.RUN_DIR: str(run_dir),
        protocol.BASE_DIGEST: digest,
        protocol.SERVER_ROUND: 1,
        protocol.LEDGER_HEADS: json.dumps(heads),
    }


def _org_of(reply) -> str:
    from fedpriv.kernel import protocol

    return str(reply.content[protocol.LEDGER][protocol.LEDGER_ORG])


def plain_round(cfg, app, template, digest: str, run_dir: Path) -> dict:
    """The node's replies to one train and one evaluate message (new-API records)."""
    from flwr.app import ConfigRecord, MessageType, RecordDict

    from fedpriv.kernel import protocol
    from fedpriv.shared_models.weights import trainable_arrays

    context = _context(NODE_IDS[0], 0, cfg.partitioning.num_orgs)
    config = _server_config(run_dir, digest, {})
    content = RecordDict({protocol.ARRAYS: trainable_arrays(template), protocol.CONFIG: ConfigRecord(config)})
    train = app(_server_message(content, NODE_IDS[0], MessageType.TRAIN), context)
    train_size = upload_bytes(train)
    arrays = train.content[protocol.ARRAYS]
    # the coordinator now holds the node's ledger entry (seq 1): the evaluate reply carries none
    org = _org_of(train)
    config = _server_config(run_dir, digest, {org: 1})
    content = RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: ConfigRecord(config)})
    evaluate = app(_server_message(content, NODE_IDS[0], MessageType.EVALUATE), context)
    return {
        "arrays": arrays,
        "train_reply_bytes": train_size["bytes"],
        "train_reply_objects": train_size["objects"],
        "evaluate_reply_bytes": upload_bytes(evaluate)["bytes"],
    }


def secagg_round(cfg, app, template, digest: str, names: list[str], run_dir: Path) -> dict:
    """The measured node's replies to the four SecAgg+ stages and one legacy evaluate message."""
    from flwr.app import ConfigRecord, MessageType, RecordDict
    from flwr.common import EvaluateIns, FitIns, ndarrays_to_parameters
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
    from flwr.compat.common import recorddict_compat as compat

    from fedpriv.kernel.legacy_messages import flat_vector
    from fedpriv.server.secure_rounds import secagg_shares

    secure = cfg.secure_aggregation
    shares, threshold = secagg_shares(cfg, len(NODE_IDS))
    contexts = {nid: _context(nid, index, len(NODE_IDS)) for index, nid in enumerate(NODE_IDS)}
    measured = NODE_IDS[0]
    sizes: dict[str, int] = {}

    def stage(node_id: int, configs: dict, content=None) -> RecordDict:
        content = content if content is not None else RecordDict()
        content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(configs)
        reply = app(_server_message(content, node_id, MessageType.TRAIN), contexts[node_id])
        if node_id == measured:
            sizes[configs[Key.STAGE]] = upload_bytes(reply)["bytes"]
        return reply.content

    setup = {
        Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: len(NODE_IDS), Key.SHARE_NUMBER: shares,
        Key.THRESHOLD: threshold, Key.CLIPPING_RANGE: float(secure.clipping_range),
        Key.TARGET_RANGE: secure.quantization_range, Key.MOD_RANGE: 2**32,  # SecAggPlusWorkflow's default modulus
        Key.MAX_WEIGHT: float(secure.max_weight),
    }  # fmt: skip
    public_keys = {}
    for nid in NODE_IDS:
        keys = stage(nid, dict(setup)).config_records[RECORD_KEY_CONFIGS]
        public_keys[str(nid)] = [keys[Key.PUBLIC_KEY_1], keys[Key.PUBLIC_KEY_2]]
    forwarded: dict[int, tuple[list, list]] = {nid: ([], []) for nid in NODE_IDS}
    for nid in NODE_IDS:  # with num_shares = every node, every node is every other's neighbour
        shared = stage(nid, {Key.STAGE: Stage.SHARE_KEYS, **public_keys}).config_records[RECORD_KEY_CONFIGS]
        for dst, ciphertext in zip(shared[Key.DESTINATION_LIST], shared[Key.CIPHERTEXT_LIST], strict=True):
            forwarded[dst][0].append(ciphertext)
            forwarded[dst][1].append(nid)
    # the coordinator's legacy parameters: one flat vector (fedpriv/kernel/legacy_messages.py)
    parameters = ndarrays_to_parameters([flat_vector([t.numpy() for t in _arrays_in_order(template, names)])])
    config = _server_config(run_dir, digest, {})
    ciphertexts, sources = forwarded[measured]
    fit = stage(
        measured,
        {Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: ciphertexts, Key.SOURCE_LIST: sources},
        compat.fitins_to_recorddict(FitIns(parameters, config), keep_input=True),
    )
    masked = fit.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
    stage(measured, {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: list(NODE_IDS), Key.DEAD_NODE_ID_LIST: []})
    evaluate_config = _server_config(run_dir, digest, {_org_of_legacy(fit): 1})
    content = compat.evaluateins_to_recorddict(EvaluateIns(parameters, evaluate_config), keep_input=True)
    evaluate = app(_server_message(content, measured, MessageType.EVALUATE), contexts[measured])
    sizes["evaluate"] = upload_bytes(evaluate)["bytes"]
    return {
        "masked_vector_bytes": sum(len(blob) for blob in masked),
        "masked_vector_dtype": _npy_dtype(masked[-1]),
        "masked_values": sum(_npy_size(blob) for blob in masked),
        "reply_bytes": sizes,
        "round_upload_bytes": sum(sizes.values()),
        "nodes": len(NODE_IDS),
        "threshold": threshold,
    }


def _org_of_legacy(content) -> str:
    from fedpriv.kernel import protocol
    from fedpriv.kernel.legacy_messages import LEDGER_PREFIX

    return str(content.config_records["fitres.metrics"][LEDGER_PREFIX + protocol.LEDGER_ORG])


def _arrays_in_order(model, names: list[str]):
    from fedpriv.shared_models.weights import trainable_state

    state = trainable_state(model)
    return [state[name] for name in names]


def _npy_dtype(blob: bytes) -> str:
    from flwr.common import bytes_to_ndarray

    return str(bytes_to_ndarray(blob).dtype)


def _npy_size(blob: bytes) -> int:
    from flwr.common import bytes_to_ndarray

    return int(bytes_to_ndarray(blob).size)


def _privacy_state(run_dir: Path, org: str, plans: dict[str, str]) -> None:
    """Give the node's fresh state folder its organisation's privacy plan once one was calibrated.

    The plan depends on the organisation's data and the training and privacy settings, not on the model,
    so it is calibrated once per run (seconds of RDP accounting each time otherwise). The accountant and
    the ledger still start empty in every folder, as at round 1 of a run; the node checks that a stored
    plan matches its settings and refuses one that does not.
    """
    from fedpriv.privacy.accountant_state import PLAN_FILE

    if org in plans:
        folder = run_dir / "nodes" / org
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PLAN_FILE).write_text(plans[org], encoding="utf-8")


def _keep_plan(run_dir: Path, org: str, plans: dict[str, str]) -> None:
    from fedpriv.privacy.accountant_state import PLAN_FILE

    plans.setdefault(org, (run_dir / "nodes" / org / PLAN_FILE).read_text(encoding="utf-8"))


def measure(model_name: str, finetuning: str, args: dict, root: Path, plans: dict[str, str]) -> dict:
    from fedpriv.client.client_app import build_client_app
    from fedpriv.client.node import fresh_model, trainable_names
    from fedpriv.data.partitioning import plan_partitions
    from fedpriv.shared_models.builder import build_model
    from fedpriv.shared_models.weights import count_trainable

    started = time.perf_counter()
    cfg = settings(model_name, finetuning, args, len(NODE_IDS))  # the same partitions with or without SecAgg+
    partitions = plan_partitions(cfg)
    org, label_names = partitions.org(0).name, partitions.label_names
    template, digest = fresh_model(cfg.model, label_names)
    names = trainable_names(cfg.model, label_names)
    trainable, _ = count_trainable(template)
    base = build_model(dataclasses.replace(cfg.model, finetuning="full"), label_names)
    full_params = sum(p.numel() for p in base.parameters())
    del base
    app = build_client_app(cfg)
    row: dict = {"model": model_name, "finetuning": finetuning}
    if cfg.model.finetuning == "lora":
        row["lora"] = {
            "r": cfg.model.lora.r,
            "target_modules": list(cfg.model.lora.target_modules),
            "freeze_a": cfg.model.lora.freeze_a,
        }
    full_bytes = 4 * full_params
    run_dir = root / f"{model_name}-{finetuning}"
    _privacy_state(run_dir / "plain", org, plans)
    plain = plain_round(cfg, app, template, digest, run_dir / "plain")
    _keep_plan(run_dir / "plain", org, plans)
    arrays = plain["arrays"]
    row.update(
        trainable_params=trainable,
        tensors=len(arrays),
        full_model_params=full_params,
        full_model_fp32_bytes=full_bytes,
        tensor_bytes=sum(array.numpy().nbytes for array in arrays.values()),
        array_bytes=sum(len(array.data) for array in arrays.values()),
        train_reply_bytes=plain["train_reply_bytes"],
        train_reply_objects=plain["train_reply_objects"],
        evaluate_reply_bytes=plain["evaluate_reply_bytes"],
    )
    row["round_upload_bytes"] = row["train_reply_bytes"] + row["evaluate_reply_bytes"]
    for key in ("array_bytes", "train_reply_bytes", "round_upload_bytes"):
        row[f"ratio_{key.removesuffix('_bytes')}"] = round(row[key] / full_bytes, 6)
    row["goal_met"] = row["round_upload_bytes"] <= GOAL * full_bytes
    if finetuning in args["secagg"].split(","):
        _privacy_state(run_dir / "secagg", org, plans)
        secure = secagg_round(cfg, app, template, digest, names, run_dir / "secagg")
        secure["ratio_masked_vector"] = round(secure["masked_vector_bytes"] / full_bytes, 6)
        secure["ratio_round_upload"] = round(secure["round_upload_bytes"] / full_bytes, 6)
        secure["goal_met"] = secure["round_upload_bytes"] <= GOAL * full_bytes
        row["secagg"] = secure
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def main(argv: list[str]) -> dict:
    args = parse(argv)
    import torch
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    torch.set_num_threads(1)
    # what Flower's runtime sets in a process before it creates messages (here the coordinator's)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, SUPERLINK_NODE_ID, 1
    import flwr

    results = {
        "goal_ratio": GOAL,
        "flwr": flwr.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "settings": {key: args[key] for key in DEFAULTS if key != "out"},
        "rows": [],
    }
    plans: dict[str, str] = {}
    with (
        contextlib.redirect_stdout(sys.stderr),  # stdout carries the one JSON line only
        tempfile.TemporaryDirectory(prefix="fedpriv-comm-bench-") as folder,
    ):
        for model_name in args["models"].split(","):
            for finetuning in args["finetuning"].split(","):
                results["rows"].append(measure(model_name, finetuning, args, Path(folder), plans))
    line = json.dumps(results)
    print(line)
    if args["out"]:
        Path(args["out"]).write_text(line + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
