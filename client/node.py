"""Who this node is: its organisation, its tokenised local data, its budget and where its state lives.

In simulation the node is one partition of a shared corpus (``partition-id`` in
``node_config``). In deployment the organisation's kit names its own
``node.yaml`` (``node-config`` in ``node_config``): its data file, privacy
budget, device and state folder, which the coordinator cannot change. Either
way the result is cached per process (a simulation process keeps the last 256
organisations it served), and a deployment node also keeps its tokenised data
on disk in its state folder, because every message starts a new process. A
deployment node's cached data is checked against the files it was read from
(node.yaml, the data files, the redaction names file) whenever it is asked for:
a changed file is read again, never served stale. Under ``fedpriv-superexec``
the data and the model template are loaded once per run, in the run's warm
process (fedpriv/runtime/superexec.py), and every message's process is forked from it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import Context

from fedpriv.client.data_report import keep_own_report
from fedpriv.client.disclosures import Sharing, shared_redaction
from fedpriv.client.tokenized import TokenizedTexts, prepare_texts, redact_visible, tokenize
from fedpriv.data.data_files import load_labelled_file, split_indices
from fedpriv.kernel import atomic_files, protocol
from fedpriv.kernel.config import FedPrivConfig, ModelConfig, RedactionConfig
from fedpriv.kernel.file_stamps import file_stamp
from fedpriv.kernel.node_config import load_node_config
from fedpriv.privacy.org_plan import org_target
from fedpriv.privacy.redaction import DISABLED_SPEC, Redactor, redactor_for
from fedpriv.shared_models.builder import build_model, build_tokenizer
from fedpriv.shared_models.weights import base_model_digest


class NodeSetupError(RuntimeError):
    """The node cannot take part as configured (reported to the server as an error reply)."""


class TrainingDivergedError(NodeSetupError):
    """Local training stopped being finite, where no reply can say so (a SecAgg+ round): the coordinator reads
    this class name in the error reply (server/secure_rounds.py) and stops the run."""


@dataclass(frozen=True)
class LocalNode:
    org: str
    label_names: list[str]
    train: TokenizedTexts
    test: TokenizedTexts
    pad_token_id: int
    target_epsilon: float
    delta: float
    max_epsilon: float  # the hard budget: rounds that would pass it are refused
    device: str
    state_dir: Path | None  # None in simulation: <run-dir>/nodes/<org>
    ledger_key: Path | None  # the kit's Ed25519 ledger key; None in simulation (<state_dir>/ledger.key, made once)
    # what redaction did to this organisation's text before tokenisation, as the organisation lets it leave the
    # node (redaction.share, client/disclosures.py): its rule set (fedpriv.privacy.redaction's spec) and which kinds were
    # "found" or the "counts" per kind over train + test; {"enabled": False} when off. Never the values.
    redaction: dict = dataclasses.field(default_factory=lambda: dict(DISABLED_SPEC))
    # what the organisation lets its node send beside its update (node.yaml; the run config in a simulation)
    sharing: Sharing = dataclasses.field(default_factory=Sharing)
    # the files this node was read from, each with its file_stamp() taken BEFORE it was read (a write during the
    # read then shows as a change); () in simulation, whose corpus is part of the installed code
    sources: tuple[tuple[str, tuple | None], ...] = ()
    # the organisation whose training a simulation's canary audit watches (canary_audit.org); never in deployment
    audited: bool = False
    # the tokens per text it cut its texts to (node.yaml's data.max_length; the run config's in a simulation)
    max_length: int | None = None


TOKEN_CACHE_DIR = "token-cache"
NODES_KEPT = 256  # a simulation process serves many organisations in turn: keep their tokenised data
_NODES: OrderedDict[tuple[str, object], LocalNode] = OrderedDict()
_TEMPLATES: dict[str, tuple[torch.nn.Module, str]] = {}
ONE_MESSAGE_ENV = "FEDPRIV_ONE_MESSAGE_PROCESS"  # set by fedpriv-superexec in a process that serves one message
_HANDED_OUT: set[str] = set()  # templates given away as the model itself (in a one-message process)


def sources_unchanged(node: object) -> bool:
    """Whether every file ``node`` was read from still has the stamp it had before it was read."""
    return all(file_stamp(path) == stamp for path, stamp in getattr(node, "sources", ()))


def _cached(cfg: FedPrivConfig, which: object, load) -> LocalNode:
    key = (cfg.to_json(), which)
    if key in _NODES:
        if sources_unchanged(_NODES[key]):
            _NODES.move_to_end(key)
            return _NODES[key]
        del _NODES[key]  # node.yaml or a data file changed since it was read: read it again
    if any(kept_cfg != key[0] for kept_cfg, _ in _NODES):
        _NODES.clear()  # another run's organisations
    _NODES[key] = load()
    while len(_NODES) > NODES_KEPT:
        _NODES.popitem(last=False)
    return _NODES[key]


def _load_partition(cfg: FedPrivConfig, partition_id: int) -> LocalNode:
    from fedpriv.data.partitioning import plan_partitions  # simulation only: deployment nodes never import it

    plan = plan_partitions(cfg)
    org = plan.org(partition_id)
    tokenizer = build_tokenizer(cfg.model.name)
    max_length = cfg.data.max_length
    target_epsilon, delta = org_target(cfg, org.name)
    redactor = _redactor(cfg.redaction)
    test = prepare_texts(org.test.texts, org.test.labels, tokenizer, max_length, redactor=redactor)
    texts, labels, redacted = org.train.texts, org.train.labels, None
    if redactor is not None:  # before the canaries: they are made-up sentences, the audit must see them as made
        texts, redacted = redact_visible(texts, tokenizer, max_length, redactor)
    audited = cfg.canary_audit.enabled and partition_id == cfg.canary_audit.org
    if audited and cfg.canary_audit.kind == "text":  # the audited organisation also trains on the canaries "in"
        from fedpriv.privacy.audit_canaries import with_canaries

        texts, labels = with_canaries(cfg, partition_id, texts, labels, len(plan.label_names), tokenizer)
    return LocalNode(
        org=org.name,
        label_names=list(plan.label_names),
        train=tokenize(texts, labels, tokenizer, max_length),
        test=test.data,
        pad_token_id=tokenizer.pad_token_id,
        target_epsilon=target_epsilon,
        delta=delta,
        max_epsilon=cfg.privacy.budget_for(org.name),
        device=cfg.training.device,
        state_dir=None,
        ledger_key=None,
        redaction=redaction_report(redactor, [redacted, test.redacted], cfg.redaction.share),
        sharing=Sharing.from_run_config(cfg),
        audited=audited,
        max_length=max_length,
    )


def _load_own_data(cfg: FedPrivConfig, node_config_path: str) -> LocalNode:
    """A deployment node: its own file, split into train/test, labelled with the federation's classes."""
    sources = [(str(node_config_path), file_stamp(node_config_path))]  # stamped before reading
    node = load_node_config(node_config_path)
    sources += [(str(path), file_stamp(path)) for path in (node.data.path, node.data.test_path) if path]
    if node.redaction.enabled and node.redaction.extra_names:
        sources.append((str(node.redaction.extra_names), file_stamp(node.redaction.extra_names)))
    label_names = list(cfg.data.labels.names or [])
    if not label_names:
        raise NodeSetupError(
            "run config: data.labels.names must list the federation's classes, so that every"
            " organisation numbers them the same way"
        )
    data = load_labelled_file(node.data.path, node.data, label_names=label_names)
    if node.data.test_path:
        test = load_labelled_file(node.data.test_path, node.data, label_names=label_names, test_file=True)
        train = data
    else:
        train_rows, test_rows = split_indices(
            list(range(len(data))), data.labels, node.data.test_fraction, cfg.run.seed
        )
        train, test = data.subset(train_rows), data.subset(test_rows)
    if len(train) < cfg.training.batch_size:
        raise NodeSetupError(
            f"organisation '{node.org}': {len(train)} training examples in {node.data.path}, fewer than one batch"
            f" (training.batch_size={cfg.training.batch_size})"
        )
    tokenizer = build_tokenizer(cfg.model.name)
    max_length = node.data.max_length
    cache = Path(node.state_dir) / TOKEN_CACHE_DIR  # every message is a new process: tokenise once per data set
    redactor = _redactor(node.redaction)
    train_data = prepare_texts(train.texts, train.labels, tokenizer, max_length, cache, redactor)
    test_data = prepare_texts(test.texts, test.labels, tokenizer, max_length, cache, redactor)
    if redactor is not None:  # the exact counts stay with the organisation, whatever it lets leave the node
        keep_own_redaction_counts(Path(node.state_dir), redactor, [train_data.redacted, test_data.redacted])
    keep_own_report(  # its class counts and texts cut at max_length, in its log and state folder (never sent)
        Path(node.state_dir),
        node.org,
        label_names,
        {"train": (train.texts, train.labels), "test": (test.texts, test.labels)},
        tokenizer,
        max_length,
        sources,
        say=lambda line: print(f"fedpriv node: {line}", file=sys.stderr, flush=True),
    )
    return LocalNode(
        org=node.org,
        label_names=label_names,
        train=train_data.data,
        test=test_data.data,
        pad_token_id=tokenizer.pad_token_id,
        target_epsilon=node.privacy.target_epsilon,
        delta=node.privacy.delta,
        max_epsilon=node.privacy.budget,
        device=node.device,
        state_dir=Path(node.state_dir),
        ledger_key=Path(node.ledger_key),
        redaction=redaction_report(redactor, [train_data.redacted, test_data.redacted], node.redaction.share),
        sharing=Sharing.from_node_config(node),
        sources=tuple(sources),
        max_length=max_length,
    )


def _redactor(cfg: RedactionConfig) -> Redactor | None:
    """The organisation's redaction rules (built once per process), or None when off."""
    return redactor_for(cfg) if cfg.enabled else None


OWN_REDACTION_FILE = "redaction-counts.json"  # in the node's state folder: never sent


def keep_own_redaction_counts(folder: Path, redactor: Redactor, counts: list[dict[str, int] | None]) -> Path:
    """The organisation's own record of how many matches its rules replaced per kind, in its state folder.

    ``redaction.share`` decides what leaves the node (by default the kinds found, not how many); the
    organisation itself should still be able to read its exact counts.
    """
    path = folder / OWN_REDACTION_FILE
    report = {**redaction_report(redactor, counts, "counts"), "note": "kept by the node; never sent"}
    return atomic_files.write_text(path, json.dumps(report, indent=2, sort_keys=True) + "\n")


def redaction_report(redactor: Redactor | None, counts: list[dict[str, int] | None], share: str = "kinds") -> dict:
    """What the ledger, the summary and the audit show: the rule set and, as ``share`` allows, which kinds were
    found (``kinds``) or the matches replaced per kind (``counts``) or neither (``none``)."""
    if redactor is None:
        return dict(DISABLED_SPEC)
    total = {kind: sum(part[kind] for part in counts if part) for kind in redactor.cfg.kinds}
    return shared_redaction(redactor.spec, total, share)


def local_node(cfg: FedPrivConfig, context: Context) -> LocalNode:
    node_config = context.node_config
    if protocol.NODE_CONFIG_FILE in node_config:
        path = str(node_config[protocol.NODE_CONFIG_FILE])
        if not cfg.privacy.enabled:  # the coordinator's run config cannot switch off this organisation's DP
            own = load_node_config(path)
            if not own.privacy.allow_non_private:
                raise NodeSetupError(
                    f"organisation '{own.org}': the run asks for training without DP (privacy.enabled=false in the"
                    " coordinator's run config); this organisation's node.yaml does not allow it"
                    " (privacy.allow_non_private)"
                )
        return _cached(cfg, path, lambda: _load_own_data(cfg, path))
    if protocol.NODE_PARTITION_ID in node_config:
        partition_id = int(node_config[protocol.NODE_PARTITION_ID])
        return _cached(cfg, partition_id, lambda: _load_partition(cfg, partition_id))
    raise NodeSetupError(
        f"node_config: expected '{protocol.NODE_CONFIG_FILE}' (the organisation's node.yaml, set in its kit's"
        f" start command) or '{protocol.NODE_PARTITION_ID}' (set by the simulation engine)"
    )


def state_dir(node: LocalNode, run_dir: str) -> Path:
    """The node's own state folder (accountant, privacy plan); never shared with the server."""
    path = node.state_dir or Path(run_dir) / "nodes" / node.org
    path.mkdir(parents=True, exist_ok=True)
    return path


def _template_key(model_cfg: ModelConfig, label_names: list[str]) -> str:
    return json.dumps([dataclasses.asdict(model_cfg), list(label_names)])


def _template(model_cfg: ModelConfig, label_names: list[str]) -> tuple[torch.nn.Module, str]:
    """The shared model, built once per process, and its base digest."""
    key = _template_key(model_cfg, label_names)
    if key not in _TEMPLATES:
        _TEMPLATES.clear()
        model = build_model(model_cfg, label_names)
        _TEMPLATES[key] = (model, base_model_digest(model))
    return _TEMPLATES[key]


def fresh_model(model_cfg: ModelConfig, label_names: list[str]) -> tuple[torch.nn.Module, str]:
    """A private copy of the shared model and its base digest.

    In a process that serves one message and ends (``FEDPRIV_ONE_MESSAGE_PROCESS``, set by fedpriv-superexec
    in each forked ClientApp), the first model asked for is the template itself: the process's memory is
    already its own copy (forked), so copying 90 MB again is only time and memory; its frozen weights stay
    pages shared with the warm parent. Any later model in that process is a copy, as everywhere else.
    """
    template, digest = _template(model_cfg, label_names)
    key = _template_key(model_cfg, label_names)
    if os.environ.get(ONE_MESSAGE_ENV) and key not in _HANDED_OUT:
        _HANDED_OUT.add(key)
        return template, digest
    if key in _HANDED_OUT:  # the template was given away and may have been trained: build a clean one
        _TEMPLATES.pop(key, None)
        _HANDED_OUT.discard(key)
        template, digest = _template(model_cfg, label_names)
    return copy.deepcopy(template), digest


def trainable_names(model_cfg: ModelConfig, label_names: list[str]) -> list[str]:
    """The exchanged tensors, in the order legacy (unnamed) messages carry them."""
    return [name for name, _ in trainable_layout(model_cfg, label_names)]


def trainable_layout(model_cfg: ModelConfig, label_names: list[str]) -> list[tuple[str, tuple[int, ...]]]:
    """The exchanged tensors' names and shapes, in the order legacy messages carry them (one flat vector)."""
    template, _ = _template(model_cfg, label_names)
    return [(name, tuple(param.shape)) for name, param in template.named_parameters() if param.requires_grad]
