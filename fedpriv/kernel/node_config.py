"""An organisation's own config in deployment (``node.yaml`` in its kit): its data, budget, device and keys.

The federation-wide run config comes from the coordinator (fedpriv/kernel/config.py); what is here never does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from fedpriv.kernel.config import DEVICE_CHECK, DataConfig, RedactionConfig, check_data_columns
from fedpriv.kernel.errors import ConfigError
from fedpriv.kernel.typed_yaml import build_dataclass, field_check, positive_check, read_yaml, shown


@dataclass(frozen=True)
class NodePrivacyConfig:
    """The organisation's own budget: the coordinator cannot raise it."""

    target_epsilon: float = field(default=8.0, metadata=positive_check("a number > 0"))
    delta: float = field(default=1e-5, metadata=field_check(lambda v: 0.0 < v < 1.0, "a number in (0, 1)"))
    # the hard budget: the node refuses any round that would take it past this (null: target_epsilon)
    max_epsilon: float | None = field(default=None, metadata=positive_check("a number > 0 or null"))
    # whether this node may take part in a run the coordinator started without DP (privacy.enabled=false in its
    # run config): no by default, such a run is refused before the node reads its data
    allow_non_private: bool = False
    # what this node sends beside its update (client/disclosures.py, docs/threat-model.md "What leaves a node"):
    # the exact mean training loss of each round is outside the DP guarantee, so it stays here unless turned on
    share_training_loss: bool = False
    # per-class counts (tp/fp/fn) on this node's test split in evaluate replies: the run's macro-F1 needs them
    share_per_class_eval: bool = True

    @property
    def budget(self) -> float:
        return self.target_epsilon if self.max_epsilon is None else self.max_epsilon


@dataclass(frozen=True)
class NodeConfig:
    """What an organisation decides for itself in deployment (``node.yaml`` in its kit).

    The federation-wide run config (model, rounds, optimiser) comes from the
    coordinator; the data, the privacy budget, the device and where the
    node's privacy state lives never do.
    """

    org: str = ""
    data: DataConfig = field(default_factory=lambda: DataConfig(source="file"))
    privacy: NodePrivacyConfig = field(default_factory=NodePrivacyConfig)
    device: str = field(default="auto", metadata=DEVICE_CHECK)
    state_dir: str = "state"
    # the organisation's Ed25519 key that signs its privacy ledger (written by `fedpriv provision`)
    ledger_key: str = "ledger.key"
    # on by default: an organisation's own text may hold personal data (a simulation of a public corpus: off)
    redaction: RedactionConfig = field(default_factory=lambda: RedactionConfig(enabled=True))
    # the apps this organisation reviewed: SHA-256 of their Flower FAB (`fedpriv app hash`). fedpriv-supernode
    # refuses a run of any other app before its code runs or this node's data and keys are read; empty: none
    approved_apps: list[str] = field(
        default_factory=list,
        metadata=field_check(
            lambda v: all(isinstance(h, str) and SHA256_HEX.fullmatch(h) for h in v),
            "a list of FAB SHA-256 digests (64 lower-case hex characters each, from `fedpriv app hash`)",
        ),
    )


SHA256_HEX = re.compile(r"[0-9a-f]{64}")
ORG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def load_node_config(path: str | Path) -> NodeConfig:
    """Parse and validate an organisation's ``node.yaml``; relative paths are relative to the file."""
    path = Path(path)
    raw = read_yaml(path)
    base = path.resolve().parent
    data = raw.get("data")
    if isinstance(data, dict):
        data = dict(data)
        data.setdefault("source", "file")
        for key in ("path", "test_path"):
            if isinstance(data.get(key), str) and data[key] and not Path(data[key]).is_absolute():
                data[key] = str(base / data[key])
        raw = dict(raw, data=data)
    redaction = raw.get("redaction")
    if isinstance(redaction, dict):
        redaction = {"enabled": True, **redaction}  # on in a node.yaml unless it says enabled: false
        if isinstance(redaction.get("extra_names"), str) and redaction["extra_names"]:
            if not Path(redaction["extra_names"]).is_absolute():
                redaction["extra_names"] = str(base / redaction["extra_names"])
        raw = dict(raw, redaction=redaction)
    for key in ("state_dir", "ledger_key"):
        value = raw.get(key, getattr(NodeConfig, key))
        if isinstance(value, str) and not Path(value).is_absolute():
            raw = dict(raw, **{key: str(base / value)})
    where = f"node config {shown(path)}"
    try:
        node = build_dataclass(NodeConfig, raw, "")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {str(exc).removeprefix('config: ')}") from None
    if not ORG_NAME.fullmatch(node.org):
        raise ConfigError(
            f"{where}: org: expected a name of letters, digits, '.', '_' or '-' (at most 64), got {node.org!r}"
        )
    if node.data.source != "file" or not node.data.path:
        raise ConfigError(
            f"{where}: data.path: required (the organisation's own CSV / TSV / JSONL / Parquet file or"
            " save_to_disk folder)"
        )
    check_data_columns(node.data, f"{where}: ")
    names = node.redaction.extra_names
    if node.redaction.enabled and names and not Path(names).is_file():
        raise ConfigError(f"{where}: redaction.extra_names: {shown(names)} is not a file (one name per line)")
    if node.privacy.budget < node.privacy.target_epsilon:
        raise ConfigError(
            f"{where}: privacy.max_epsilon: {node.privacy.max_epsilon} is below target_epsilon"
            f" {node.privacy.target_epsilon}; the budget must be at least the target"
        )
    return node
