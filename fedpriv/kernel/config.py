"""The run's config: its schema (frozen dataclasses), the packaged default, and the rules across fields.

A run is described by one YAML file (the packaged default when none is given)
plus ``key=value`` overrides. Everything is turned into frozen dataclasses here;
no other module reads raw dicts. Unknown keys, wrong types and out-of-range
values raise :class:`ConfigError` with one line naming the key (the reading and
typing: fedpriv/kernel/typed_yaml.py; an organisation's node.yaml:
fedpriv/kernel/node_config.py).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from fedpriv.kernel.errors import ConfigError
from fedpriv.kernel.typed_yaml import (
    build_dataclass,
    deep_merge,
    field_check,
    fraction_check,
    load_yaml,
    parse_overrides,
    positive_check,
    read_yaml,
    shown,
)

DEFAULT_CONFIG_NAME = "default.yaml"
FLOAT32_MAX = 3.4028234663852886e38


def _seed():
    # numpy refuses negative seeds and torch.manual_seed overflows past 2**64 (run.seed is also scaled per round)
    return field_check(lambda v: 0 <= v < 2**32, "an integer in [0, 2**32 - 1]")


DEVICE_CHECK = field_check(
    lambda v: re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", v) is not None, "auto, cpu, cuda or cuda:N"
)


@dataclass(frozen=True)
class RunConfig:
    name: str = "fedpriv"
    seed: int = field(default=42, metadata=_seed())
    out_dir: str | None = None


@dataclass(frozen=True)
class LabelConfig:
    """How raw label values become class names.

    ``map`` sends raw values (compared as strings) to class names; ``ranges``
    sends numeric raw values within an inclusive [low, high] to a class name.
    The class order is the order the user gave: ``names``, else the order in
    which ``map``'s values or ``ranges``' names are written, else the order a
    Parquet / ``save_to_disk`` file declares (a ``ClassLabel``), else sorted.
    """

    names: list[str] | None = None
    map: dict[str, str] = field(default_factory=dict)
    ranges: dict[str, list[float]] = field(default_factory=dict)


# a column: its header name, or its 0-based number (the only way when data.header is false)
Column = str | int
# formats whose columns have names of their own: data.header does not apply
SCHEMA_FORMATS = ("jsonl", "parquet", "hf_disk")


@dataclass(frozen=True)
class DataConfig:
    """A labelled text file or folder (fedpriv/data/data_files.py reads it).

    ``text_column`` may list several columns, joined with ``text_separator``
    (AG News: title and description). ``header: false`` reads a CSV/TSV file
    without a header row, whose columns are then 0-based numbers.
    ``skip_rows`` skips that many rows after the header. ``format: orange``
    reads Orange's ``.tab`` files (type and flag rows under the header; ``auto``
    detects them in a ``.tab`` file). ``parquet`` and ``hf_disk`` (a folder
    written by Hugging Face ``datasets``' ``save_to_disk``) are read with
    ``datasets``; from a DatasetDict folder ``split`` (``test_split`` for
    ``test_path``) is read.
    """

    source: str = "bbc_news"
    path: str | None = None
    format: Literal["auto", "csv", "tsv", "jsonl", "orange", "parquet", "hf_disk"] = "auto"
    encoding: str = "utf-8"
    header: bool = True
    skip_rows: int = field(default=0, metadata=field_check(lambda v: v >= 0, "an integer >= 0"))
    text_column: Column | list[Column] = "text"
    text_separator: str = " "
    label_column: Column = "label"
    labels: LabelConfig = field(default_factory=LabelConfig)
    split: str = "train"
    test_path: str | None = None
    test_text_column: Column | list[Column] | None = None
    test_split: str = "test"
    test_fraction: float = field(default=0.2, metadata=field_check(lambda v: 0.0 < v < 1.0, "a number in (0, 1)"))
    max_examples: int | None = field(default=None, metadata=positive_check("an integer > 0"))
    html_unescape: bool = False
    max_length: int = field(default=128, metadata=field_check(lambda v: 8 <= v <= 4096, "an integer in [8, 4096]"))


@dataclass(frozen=True)
class PartitioningConfig:
    scheme: Literal["iid", "dirichlet", "natural"] = "iid"
    num_orgs: int = field(default=4, metadata=positive_check("an integer > 0"))
    alpha: float = field(default=0.5, metadata=positive_check())
    column: Column | None = None  # a name, or a 0-based number with data.header: false
    min_partition_size: int = field(default=10, metadata=field_check(lambda v: v >= 0, "an integer >= 0"))


@dataclass(frozen=True)
class LoraConfig:
    """``freeze_a``: train only the B matrices (A stays at its seeded random draw, the same on every party).

    FedAvg of A and B separately is not the average of the organisations' updates B·A; with A frozen it
    is exactly that, DP noise lands on B only (not on a product of two noisy factors), and each upload
    halves (FFA-LoRA, Sun et al., ICLR 2024).
    """

    r: int = field(default=8, metadata=positive_check("an integer > 0"))
    alpha: float = field(default=16.0, metadata=positive_check())
    dropout: float = field(default=0.0, metadata=field_check(lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"))
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    freeze_a: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """``name``: ``minilm`` (packaged pretrained), ``tiny`` (random, for tests) or a local HF directory.

    ``pooling``: what the classification head reads. ``mean``: the mean of the token states (what
    sentence-transformers checkpoints such as all-MiniLM-L6-v2 were trained to make a sentence embedding);
    ``cls``: BERT's pooled [CLS] token (``BertForSequenceClassification``); ``auto``: ``mean`` for a checkpoint
    whose sentence-transformers pooling is the mean (``1_Pooling/config.json``), else ``cls``.
    """

    name: str = "minilm"
    finetuning: Literal["lora", "full"] = "lora"
    pooling: Literal["auto", "cls", "mean"] = "auto"
    lora: LoraConfig = field(default_factory=LoraConfig)
    init_seed: int = field(default=0, metadata=_seed())


@dataclass(frozen=True)
class TrainingConfig:
    rounds: int = field(default=3, metadata=positive_check("an integer > 0"))
    local_epochs: int = field(default=1, metadata=positive_check("an integer > 0"))
    batch_size: int = field(default=32, metadata=positive_check("an integer > 0"))
    eval_batch_size: int = field(default=64, metadata=positive_check("an integer > 0"))
    optimizer: Literal["adamw", "sgd"] = "adamw"
    # float32 weights cannot take a larger step: torch's optimizers fail on one (a diverging smaller one stops the
    # run with its round and organisation, client/training.py)
    learning_rate: float = field(
        default=5e-4,
        metadata=field_check(lambda v: 0 < v <= FLOAT32_MAX, "a number > 0 and <= 3.4e38 (float32's largest)"),
    )
    # The learning rate across rounds: constant, or cosine from learning_rate in round 1 down to
    # learning_rate x min_lr_ratio in the last planned round (a function of the round number only: it reads no
    # data, so it costs no privacy, and a resumed run gets the same rates).
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = field(default=0.1, metadata=fraction_check())
    weight_decay: float = field(default=0.0, metadata=field_check(lambda v: v >= 0, "a number >= 0"))
    device: str = field(default="auto", metadata=DEVICE_CHECK)
    # auto: bf16 autocast on a CUDA device that supports it, fp32 elsewhere (bf16 on CPU is opt-in: slow without AMX)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Micro-batching inside each logical batch (the Poisson sample under DP): examples sorted by length are cut
    # into micro-batches of at most max_batch_tokens padded tokens and/or max_physical_batch_size examples, their
    # clipped gradients summed, and ONE optimizer step (one noise draw, one accounted step) taken per logical
    # batch. null and null: the whole batch in one pass, padded to its longest example.
    max_batch_tokens: int | None = field(default=None, metadata=positive_check("an integer > 0 or null"))
    max_physical_batch_size: int | None = field(default=None, metadata=positive_check("an integer > 0 or null"))
    sort_by_length: bool = True  # sort each logical batch by length before cutting it (false: cut in sampled order)


@dataclass(frozen=True)
class OrgPrivacyConfig:
    """Per-organisation override of the privacy target and budget."""

    target_epsilon: float | None = None
    delta: float | None = None
    max_epsilon: float | None = None


@dataclass(frozen=True)
class PrivacyConfig:
    enabled: bool = True
    target_epsilon: float = field(default=8.0, metadata=positive_check("a number > 0"))
    delta: float = field(default=1e-5, metadata=field_check(lambda v: 0.0 < v < 1.0, "a number in (0, 1)"))
    max_grad_norm: float = field(default=1.0, metadata=positive_check())
    accountant: Literal["rdp", "prv"] = "rdp"
    # per-example clipping: auto = book-keeping ("bk") when every trainable layer supports it, else Opacus "hooks"
    grad_sample_mode: Literal["auto", "bk", "hooks", "ghost"] = "auto"
    # the hard budget: a node refuses any round that would take it past this (null: target_epsilon)
    max_epsilon: float | None = field(default=None, metadata=positive_check("a number > 0 or null"))
    orgs: dict[str, OrgPrivacyConfig] = field(default_factory=dict)
    # simulation: what every virtual organisation sends beside its update (deployment: each node.yaml decides;
    # see client/disclosures.py and docs/threat-model.md, "What leaves a node")
    share_training_loss: bool = False  # the exact mean training loss (outside the DP guarantee): off by default
    share_per_class_eval: bool = True  # per-class test counts (tp/fp/fn) in evaluate replies: the summary's macro-F1

    def target_for(self, org: str) -> tuple[float, float]:
        """(target_epsilon, delta) for one organisation, overrides applied."""
        override = self.orgs.get(org, OrgPrivacyConfig())
        eps = override.target_epsilon if override.target_epsilon is not None else self.target_epsilon
        delta = override.delta if override.delta is not None else self.delta
        return eps, delta

    def budget_for(self, org: str) -> float:
        """max_epsilon for one organisation: its override, else the run's, else its target."""
        override = self.orgs.get(org, OrgPrivacyConfig())
        for value in (override.max_epsilon, self.max_epsilon):
            if value is not None:
                return value
        return self.target_for(org)[0]


@dataclass(frozen=True)
class FedAdamConfig:
    eta: float = field(default=1e-2, metadata=positive_check())
    eta_l: float = field(default=1e-1, metadata=positive_check())
    beta_1: float = field(default=0.9, metadata=fraction_check())
    beta_2: float = field(default=0.99, metadata=fraction_check())
    tau: float = field(default=1e-3, metadata=positive_check())


@dataclass(frozen=True)
class StrategyConfig:
    # fedtrimmedavg, fedmedian, krum: robust aggregation of individual updates (plain path only)
    name: Literal["fedavg", "fedprox", "fedadam", "fedtrimmedavg", "fedmedian", "krum"] = "fedavg"
    fraction_train: float = field(default=1.0, metadata=field_check(lambda v: 0.0 < v <= 1.0, "a number in (0, 1]"))
    fraction_evaluate: float = field(default=1.0, metadata=fraction_check())
    min_train_nodes: int = field(default=2, metadata=positive_check("an integer > 0"))
    min_evaluate_nodes: int = field(default=2, metadata=field_check(lambda v: v >= 0, "an integer >= 0"))
    # nodes the server waits for before round 1; None = partitioning.num_orgs (deployment: the enrolled organisations)
    min_available_nodes: int | None = field(default=None, metadata=positive_check("an integer > 0 or null"))
    proximal_mu: float = field(default=0.01, metadata=field_check(lambda v: v >= 0, "a number >= 0"))
    fedadam: FedAdamConfig = field(default_factory=FedAdamConfig)
    round_timeout: float = field(default=3600.0, metadata=positive_check())
    # ask every node to load its data and model and plan its noise before round 1 (server/preflight.py);
    # auto: in deployment only (a simulation plans every organisation itself)
    preflight: Literal["auto", "always", "never"] = "auto"
    # reject a node's update whose L2 distance from the round's global weights exceeds this (null: no bound)
    max_update_norm: float | None = field(default=None, metadata=positive_check("a number > 0 or null"))
    trim_fraction: float = field(  # fedtrimmedavg: cut this fraction of the values at each end, per coordinate
        default=0.2, metadata=field_check(lambda v: 0.0 <= v < 0.5, "a number in [0, 0.5)")
    )
    num_malicious_nodes: int = field(default=0, metadata=field_check(lambda v: v >= 0, "an integer >= 0"))  # krum

    def planned_train_nodes(self, num_nodes: int) -> int:
        """How many nodes a round samples for training out of ``num_nodes`` (Flower's FedAvg sampling rule)."""
        return max(min(self.min_train_nodes, num_nodes), int(self.fraction_train * num_nodes))


ROBUST_STRATEGIES = ("fedtrimmedavg", "fedmedian", "krum")


@dataclass(frozen=True)
class SecureAggregationConfig:
    """Flower's SecAgg+: the coordinator sees only the sum of the masked updates, never one organisation's.

    ``num_shares`` / ``reconstruction_threshold`` default to every node and
    two thirds of them; a round survives dropouts down to the threshold.
    ``clipping_range`` bounds |weight x num_examples / max_weight| before
    quantisation to ``quantization_range`` levels; ``max_weight`` must be at
    least the largest organisation's number of training examples.
    """

    enabled: bool = False
    num_shares: int | None = field(default=None, metadata=field_check(lambda v: v >= 3, "an integer >= 3 or null"))
    reconstruction_threshold: int | None = field(
        default=None, metadata=field_check(lambda v: v >= 2, "an integer >= 2 or null")
    )
    clipping_range: float = field(default=8.0, metadata=positive_check())
    quantization_range: int = field(
        default=2**22, metadata=field_check(lambda v: 2**8 <= v <= 2**24, "an integer in [256, 16777216]")
    )
    max_weight: float = field(default=1_000.0, metadata=positive_check())


@dataclass(frozen=True)
class ClientResources:
    num_cpus: int = field(default=1, metadata=positive_check("an integer > 0"))
    num_gpus: float = field(default=0.0, metadata=field_check(lambda v: v >= 0, "a number >= 0"))


def _ray_address_ok(value: str) -> bool:
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):([0-9]{1,5})", value)
    return value == "auto" or (match is not None and 0 < int(match.group(2)) < 65536)


@dataclass(frozen=True)
class SimulationConfig:
    client_resources: ClientResources = field(default_factory=ClientResources)
    # run the virtual organisations on an existing Ray cluster: HOST:PORT of its head (what `ray start --head`
    # prints) or auto (RAY_ADDRESS, else the cluster `ray start` last started here); null: a private Ray instance
    ray_address: str | None = field(
        default=None,
        metadata=field_check(
            _ray_address_ok, "HOST:PORT of a running Ray cluster's head (`ray start --head` prints it), auto or null"
        ),
    )


@dataclass(frozen=True)
class OutputConfig:
    keep_checkpoints: int = field(default=0, metadata=field_check(lambda v: v >= 0, "an integer >= 0 (0 keeps all)"))
    export_model: bool = True


@dataclass(frozen=True)
class ClientDPConfig:
    """Organisation-level DP on top of each node's example-level DP-SGD (``server/client_dp.py``).

    The coordinator clips every organisation's update to ``clipping_norm``
    (``fixed``; ``adaptive`` tracks the ``target_clipped_quantile`` of update
    norms: that fraction of updates goes unclipped) and releases the sum of the
    clipped updates divided by the number of organisations planned per round,
    plus Gaussian noise with ``noise_multiplier`` (fixed-denominator estimator):
    adding or removing one organisation's whole contribution is protected at
    (epsilon, ``delta``), recorded per round in the coordinator's ledger. The
    run stops before a round would carry that epsilon past ``max_epsilon``.
    With ``adaptive``, ``noise_multiplier`` is the effective multiplier of the
    update and the noised count of unclipped updates (std
    ``clipped_count_stddev``, default organisations/20) together.
    """

    enabled: bool = False
    clipping: Literal["fixed", "adaptive"] = "fixed"
    noise_multiplier: float = field(default=1.0, metadata=positive_check())
    clipping_norm: float = field(default=1.0, metadata=positive_check())  # adaptive: the initial norm
    target_clipped_quantile: float = field(default=0.5, metadata=fraction_check())
    clip_norm_lr: float = field(default=0.2, metadata=positive_check())
    clipped_count_stddev: float | None = field(default=None, metadata=positive_check("a number > 0 or null"))
    delta: float = field(default=1e-5, metadata=field_check(lambda v: 0.0 < v < 1.0, "a number in (0, 1)"))
    max_epsilon: float = field(default=10.0, metadata=positive_check())

    def count_stddev(self, organisations: int) -> float:
        """Adaptive clipping: the std of the noise on the count of unclipped updates (Andrew et al.: n/20)."""
        return self.clipped_count_stddev if self.clipped_count_stddev is not None else organisations / 20

    def update_noise_multiplier(self, organisations: int) -> float:
        """The multiplier of the noise on the updates: ``noise_multiplier`` itself, or with ``adaptive``
        (z_update^-2 + (2 sigma_b)^-2)^-1/2 = noise_multiplier (Andrew et al. 2021), so that the update and the
        count together are as private as one Gaussian mechanism with ``noise_multiplier``."""
        z = self.noise_multiplier
        if self.clipping != "adaptive":
            return z
        sigma_b = self.count_stddev(organisations)
        if 2 * sigma_b <= z * (1 + 1e-9):
            default = "" if self.clipped_count_stddev is not None else f" (default: {organisations} organisations / 20)"
            raise ConfigError(
                f"config: client_dp.clipped_count_stddev: {sigma_b:g}{default} is too small for adaptive clipping at"
                f" noise_multiplier {z:g} (the update and the count together must match it, which needs more than"
                f" noise_multiplier / 2); set it above {z / 2:g}"
            )
        return (z**-2 - (2 * sigma_b) ** -2) ** -0.5


@dataclass(frozen=True)
class CanaryAuditConfig:
    """Empirical privacy audit in simulation (Steinke, Nasr and Jagielski 2023, one training run).

    ``canaries`` canaries are made; each is included with probability 1/2, in
    organisation ``org`` only. ``kind: gradient`` (white-box, the default): each
    canary is one coordinate of the trainable parameters (a Dirac gradient of
    norm ``privacy.max_grad_norm`` with a random sign) that the node adds to its
    clipped gradient sum, before the noise, at every step that Poisson-samples
    it (exactly one more example to DP-SGD); it is scored by how far its
    coordinate moved in its direction. ``kind: text``: random sentences with
    random labels added to the organisation's training data, scored by the
    final model's loss. The ``guesses`` best-scored canaries are guessed "in"
    and the ``guesses`` worst "out"; the right guesses give a lower bound on
    epsilon that holds with probability ``confidence``. The largest bound these
    settings can show at all (every guess right) is ``max_reachable_epsilon``:
    the defaults (gradient: 16,000 canaries, every one guessed) reach 8.1 at
    95% and delta 1e-5; text canaries default to 200 with 20 guesses each way
    (reachable 2.55: text canaries cannot number in the thousands without
    swamping the organisation's data).
    """

    enabled: bool = False
    kind: Literal["gradient", "text"] = "gradient"
    canaries: int | None = field(default=None, metadata=positive_check("an integer > 0 or null (the kind's default)"))
    guesses: int | None = field(default=None, metadata=positive_check("an integer > 0 or null (the kind's default)"))
    org: int = field(default=0, metadata=field_check(lambda v: v >= 0, "an integer >= 0 (a partition index)"))
    confidence: float = field(default=0.95, metadata=field_check(lambda v: 0.0 < v < 1.0, "a number in (0, 1)"))
    seed: int = field(default=0, metadata=_seed())

    @property
    def count(self) -> int:
        """The number of canaries: ``canaries``, or the kind's default (gradient 16,000; text 200).

        A simulation fits the gradient default to the model's trainable coordinates when it has fewer
        (privacy/audit_canaries.py ``fitted``)."""
        return self.canaries if self.canaries is not None else DEFAULT_CANARIES[self.kind]

    @property
    def guesses_each_way(self) -> int:
        """Guesses "in" (and as many "out"): ``guesses``, or the kind's default (gradient: every canary guessed,
        count // 2 each way; text: count // 10 each way)."""
        if self.guesses is not None:
            return self.guesses
        return max(1, self.count // 2 if self.kind == "gradient" else self.count // 10)


# the kinds' default numbers of canaries: 16,000 gradient canaries, all guessed, can show epsilon >= 8.11 at 95%
# confidence and delta 1e-5 (privacy/canaries.py max_reachable_epsilon); 200 text canaries with 20 guesses each
# way at most 2.55
DEFAULT_CANARIES = {"gradient": 16_000, "text": 200}


# what a node can redact from its text before tokenisation (privacy/redaction.py maps each to its recognizers)
REDACTION_KINDS = (
    "email", "phone", "url", "ip_address", "payment_card", "bank_account", "national_id", "date_of_birth",
    "handle", "person",
)  # fmt: skip
# national ID formats and phone-number regions, per country (privacy/redaction.py)
REDACTION_LOCALES = ("us", "uk", "ca", "au", "in", "es", "it", "pl", "sg", "fi", "se", "de", "za")


def _distinct_within(allowed: tuple[str, ...], what: str):
    return field_check(
        lambda v: bool(v) and set(v) <= set(allowed) and len(set(v)) == len(v),
        f"a non-empty list of distinct {what} from: {', '.join(allowed)}",
    )


@dataclass(frozen=True)
class RedactionConfig:
    """Personal data a node removes from its text before tokenisation (issue 7; see README "Redaction").

    Each match of a ``kinds`` rule is replaced by its typed placeholder
    (``[EMAIL]``, ``[PHONE]`` ...); national IDs and phone numbers follow the
    formats of ``locales``. ``rules`` names the rule set in the ledger, the
    summary and the exported model. ``extra_names`` is a UTF-8 text file of
    names the organisation knows (staff, patients), one per line, redacted
    on top of the packaged name lists. Matches scoring below ``min_score``
    (the analyzer's confidence) are kept.
    """

    enabled: bool = False
    rules: str = field(
        default="fedpriv-pii",
        metadata=field_check(lambda v: re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", v) is not None,
                        "a name of letters, digits, '.', '_' or '-' (at most 64)"),
    )  # fmt: skip
    kinds: list[str] = field(
        default_factory=lambda: list(REDACTION_KINDS), metadata=_distinct_within(REDACTION_KINDS, "kinds")
    )
    locales: list[str] = field(
        default_factory=lambda: ["us", "uk"], metadata=_distinct_within(REDACTION_LOCALES, "locales")
    )
    min_score: float = field(default=0.4, metadata=field_check(lambda v: 0.0 < v <= 1.0, "a number in (0, 1]"))
    extra_names: str | None = None
    # what leaves the node about what was redacted (replies, signed ledger entries, summary.json, model card):
    # kinds = which kinds were found, not how many; counts = exact matches per kind (outside the DP guarantee);
    # none = only the rule set. Never the values. Not part of the rule set's identity (spec, digest).
    share: Literal["kinds", "counts", "none"] = "kinds"


@dataclass(frozen=True)
class FedPrivConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partitioning: PartitioningConfig = field(default_factory=PartitioningConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    canary_audit: CanaryAuditConfig = field(default_factory=CanaryAuditConfig)
    client_dp: ClientDPConfig = field(default_factory=ClientDPConfig)
    # simulation: applied to every virtual organisation (deployment: each organisation's node.yaml decides)
    redaction: RedactionConfig = field(default_factory=RedactionConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (what ``summary.json`` records as the resolved config)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def check_data_columns(data: DataConfig, prefix: str) -> None:
    """Column settings that only make sense together (header, numbers, lists); ``prefix`` starts each message."""
    for key, value in (("text_column", data.text_column), ("test_text_column", data.test_text_column)):
        if isinstance(value, list) and not value:
            raise ConfigError(f"{prefix}data.{key}: expected a column or a non-empty list of columns, got []")
    named = [("label_column", data.label_column)]
    for key, value in (("text_column", data.text_column), ("test_text_column", data.test_text_column)):
        if value is not None:
            named += [(key, v) for v in (value if isinstance(value, list) else [value])]
    for key, value in named:
        if isinstance(value, int) and value < 0:
            raise ConfigError(
                f"{prefix}data.{key}: expected a column name or a 0-based column number >= 0, got {value}"
            )
        if not data.header and isinstance(value, str) and not value.isdigit():
            raise ConfigError(
                f"{prefix}data.{key}: {shown(value)!r} is a column name, but data.header is false (no header row):"
                " give the column's 0-based number, for example 0 for the first column"
            )
    if not data.header and data.format in SCHEMA_FORMATS:
        raise ConfigError(
            f"{prefix}data.header: false applies to CSV and TSV files; data.format {data.format} names its columns"
        )
    names = data.labels.names
    if names is not None and len(set(names)) < 2:
        raise ConfigError(f"{prefix}data.labels.names: expected at least two distinct class names, got {names}")
    if names is not None and len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"{prefix}data.labels.names: {shown(twice[0])!r} is listed more than once")


def _cross_checks(cfg: FedPrivConfig) -> None:
    """Rules that involve more than one field."""
    data, part = cfg.data, cfg.partitioning
    if data.source == "file" and not data.path:
        raise ConfigError("config: data.path: required when data.source is 'file'")
    if part.scheme == "natural" and not part.column:
        raise ConfigError("config: partitioning.column: required when partitioning.scheme is 'natural'")
    check_data_columns(data, "config: ")
    if data.labels.map and data.labels.ranges:
        raise ConfigError("config: data.labels: give either 'map' or 'ranges', not both")
    for name, bounds in data.labels.ranges.items():
        if len(bounds) != 2 or bounds[0] > bounds[1]:
            raise ConfigError(
                f"config: data.labels.ranges.{shown(name)}: expected [low, high] with low <= high, got {bounds}"
            )
    if cfg.model.finetuning == "lora" and not cfg.model.lora.target_modules:
        raise ConfigError("config: model.lora.target_modules: expected at least one module name")
    for org, override in cfg.privacy.orgs.items():
        if override.target_epsilon is not None and override.target_epsilon <= 0:
            raise ConfigError(f"config: privacy.orgs.{shown(org)}.target_epsilon: expected a number > 0")
        if override.delta is not None and not 0 < override.delta < 1:
            raise ConfigError(f"config: privacy.orgs.{shown(org)}.delta: expected a number in (0, 1)")
        if override.max_epsilon is not None and override.max_epsilon <= 0:
            raise ConfigError(f"config: privacy.orgs.{shown(org)}.max_epsilon: expected a number > 0")
    for org in ["", *cfg.privacy.orgs]:
        target, budget = cfg.privacy.target_for(org)[0], cfg.privacy.budget_for(org)
        if budget < target:
            where = f"privacy.orgs.{shown(org)}" if org else "privacy"
            raise ConfigError(
                f"config: {where}.max_epsilon: {budget} is below target_epsilon {target}; the noise is calibrated"
                " to reach the target, so the budget must be at least that"
            )
    tokens = cfg.training.max_batch_tokens
    if tokens is not None and tokens < data.max_length:
        raise ConfigError(
            f"config: training.max_batch_tokens: expected >= data.max_length ({data.max_length}) so that the longest"
            f" example fits in a micro-batch, got {tokens}"
        )
    if cfg.strategy.name in ROBUST_STRATEGIES and cfg.secure_aggregation.enabled:
        raise ConfigError(
            f"config: strategy.name: {cfg.strategy.name} compares the organisations' individual updates, which"
            " SecAgg+ hides from the coordinator; use fedavg, fedprox or fedadam with secure_aggregation.enabled"
        )
    if cfg.client_dp.enabled and cfg.secure_aggregation.enabled:
        raise ConfigError(
            "config: client_dp.enabled: the coordinator clips each organisation's update, which SecAgg+ hides;"
            " turn off secure_aggregation.enabled for organisation-level DP (node-level DP-SGD stays on either way)"
        )
    if cfg.client_dp.enabled and cfg.strategy.name in ROBUST_STRATEGIES:
        raise ConfigError(
            f"config: strategy.name: {cfg.strategy.name} compares the organisations' individual updates, but with"
            " client_dp.enabled the coordinator only releases their clipped, noised sum; use fedavg, fedprox or fedadam"
        )
    if cfg.client_dp.enabled:  # adaptive clipping: enough noise on the count for the budget (raises ConfigError)
        nodes = cfg.strategy.min_available_nodes or cfg.partitioning.num_orgs
        cfg.client_dp.update_noise_multiplier(cfg.strategy.planned_train_nodes(nodes))
    canary = cfg.canary_audit
    if canary.enabled and 2 * canary.guesses_each_way > canary.count:
        guesses = canary.guesses_each_way
        raise ConfigError(
            f"config: canary_audit.guesses: {guesses} 'in' and {guesses} 'out' guesses need at least"
            f" {2 * guesses} canaries (canary_audit.canaries={canary.count})"
        )
    if canary.enabled and canary.org >= cfg.partitioning.num_orgs:
        raise ConfigError(
            f"config: canary_audit.org: {canary.org} is not a partition index below partitioning.num_orgs"
            f" ({cfg.partitioning.num_orgs})"
        )
    secagg = cfg.secure_aggregation
    if (
        secagg.num_shares is not None
        and secagg.reconstruction_threshold is not None
        and secagg.reconstruction_threshold >= secagg.num_shares
    ):
        raise ConfigError(
            f"config: secure_aggregation.reconstruction_threshold: expected < num_shares ({secagg.num_shares}),"
            f" got {secagg.reconstruction_threshold}"
        )
    if cfg.strategy.min_train_nodes > part.num_orgs:
        raise ConfigError(
            f"config: strategy.min_train_nodes: expected <= partitioning.num_orgs ({part.num_orgs}),"
            f" got {cfg.strategy.min_train_nodes}"
        )


def default_config_text() -> str:
    """The packaged default config (what ``fedpriv simulate`` runs with no arguments)."""
    return resources.files("fedpriv.kernel.configs").joinpath(DEFAULT_CONFIG_NAME).read_text(encoding="utf-8")


def config_from_dict(raw: dict[str, Any]) -> FedPrivConfig:
    cfg = build_dataclass(FedPrivConfig, raw, "")
    _cross_checks(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> FedPrivConfig:
    """Load a YAML config (the packaged default when ``path`` is None) and apply overrides.

    A user config is layered on top of the packaged default, so it only needs
    the keys it changes.
    """
    raw = load_yaml(default_config_text()) or {}
    if path is not None:
        user = read_yaml(Path(path))
        raw = deep_merge(raw, user)
        base = Path(path).resolve().parent
        raw = _resolve_relative_paths(raw, base, user)
    if overrides:
        raw = deep_merge(raw, parse_overrides(overrides))
    return config_from_dict(raw)


def _resolve_relative_paths(raw: dict[str, Any], base: Path, user: dict[str, Any]) -> dict[str, Any]:
    """Data paths given in a config file are relative to that file, as users expect."""
    data = raw.get("data")
    user_data = user.get("data") if isinstance(user.get("data"), dict) else {}
    if isinstance(data, dict):
        data = dict(data)
        for key in ("path", "test_path"):
            value = user_data.get(key)
            if isinstance(value, str) and value and not Path(value).is_absolute():
                data[key] = str(base / value)
        raw = dict(raw, data=data)
    redaction, user_redaction = raw.get("redaction"), user.get("redaction")
    if isinstance(redaction, dict) and isinstance(user_redaction, dict):
        value = user_redaction.get("extra_names")
        if isinstance(value, str) and value and not Path(value).is_absolute():
            raw = dict(raw, redaction=dict(redaction, extra_names=str(base / value)))
    return raw


def config_from_json(text: str) -> FedPrivConfig:
    """Inverse of :meth:`FedPrivConfig.to_json` (used to hand the config to Flower apps)."""
    return config_from_dict(json.loads(text))


def redaction_from_dict(raw: Any, where: str) -> RedactionConfig:
    """A redaction rule set stored as data (an exported model's ``redaction.json``), validated like a config."""
    try:
        return build_dataclass(RedactionConfig, raw, "")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {str(exc).removeprefix('config: ')}") from None
