"""The run config's schema: packaged default, overrides, layering, validation errors, round trips."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpriv.kernel.config import (
    FedPrivConfig,
    OrgPrivacyConfig,
    config_from_dict,
    config_from_json,
    default_config_text,
    load_config,
)
from fedpriv.kernel.errors import ConfigError, UserError
from fedpriv.kernel.typed_yaml import parse_overrides
from tests.fedpriv.kernel.one_line_errors import config_error


def overrides_error(*overrides: str, names: tuple[str, ...] | str) -> str:
    return config_error(load_config, None, list(overrides), names=names)


# --------------------------------------------------------------------------- the packaged default


def test_packaged_default_has_documented_defaults():
    cfg = load_config()
    assert cfg.model.name == "minilm"
    assert cfg.model.finetuning == "lora"
    assert cfg.model.lora.target_modules == ["query", "value"]
    assert cfg.privacy.enabled is True
    assert cfg.privacy.target_epsilon == 8.0
    assert cfg.privacy.delta == 1e-5
    assert cfg.privacy.accountant == "rdp"
    assert cfg.privacy.orgs == {}
    assert cfg.training.rounds == 3
    assert cfg.partitioning.num_orgs == 4
    assert cfg.partitioning.scheme == "dirichlet"
    assert cfg.partitioning.alpha == 1.0
    assert cfg.data.source == "bbc_news"
    assert cfg.data.max_examples is None  # the demo uses every BBC article
    assert (cfg.training.batch_size, cfg.training.local_epochs, cfg.data.max_length) == (64, 2, 64)
    assert cfg.strategy.name == "fedavg"
    assert cfg.run.out_dir is None


def test_packaged_default_documents_every_key():
    """default.yaml lists every schema key (it is the reference users copy), and nothing else."""
    raw = yaml.safe_load(default_config_text())

    def walk(cls, node, prefix):
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        assert isinstance(node, dict), prefix
        assert set(node) == names, f"{prefix or '<top>'}: default.yaml keys {sorted(node)} != schema {sorted(names)}"
        for name in names:
            if dataclasses.is_dataclass(hints[name]):
                walk(hints[name], node[name], f"{prefix}{name}.")

    walk(FedPrivConfig, raw, "")


def test_empty_dict_gives_dataclass_defaults():
    assert config_from_dict({}) == FedPrivConfig()
    assert config_from_dict({"training": None}) == FedPrivConfig()


# --------------------------------------------------------------------------- overrides


def test_override_nested_dotted_key_keeps_siblings():
    cfg = load_config(None, ["model.lora.r=4"])
    assert cfg.model.lora.r == 4
    assert cfg.model.lora.alpha == 16.0
    assert cfg.model.lora.target_modules == ["query", "value"]
    assert cfg.model.name == "minilm"


def test_override_yaml_typing():
    cfg = load_config(
        None,
        [
            "training.rounds=5",
            "privacy.delta=1e-6",
            "privacy.target_epsilon=3",
            "model.lora.target_modules=[query,key]",
            "privacy.orgs={org-1: {target_epsilon: 2}}",
            "privacy.enabled=false",
            "data.max_examples=null",
        ],
    )
    assert cfg.training.rounds == 5 and type(cfg.training.rounds) is int
    assert cfg.privacy.delta == 1e-6 and type(cfg.privacy.delta) is float
    assert cfg.privacy.target_epsilon == 3.0 and type(cfg.privacy.target_epsilon) is float
    assert cfg.model.lora.target_modules == ["query", "key"]
    assert cfg.privacy.orgs == {"org-1": OrgPrivacyConfig(target_epsilon=2.0)}
    assert cfg.privacy.enabled is False
    assert cfg.data.max_examples is None


@pytest.mark.parametrize("text", ["1e-6", "1E-6", "1.0e-6", "0.000001", "+1e-6", ".1e-5"])
def test_override_float_spellings(text):
    assert load_config(None, [f"privacy.delta={text}"]).privacy.delta == pytest.approx(1e-6)


def test_override_mapping_keys_are_strings():
    cfg = load_config(None, ['data.labels.map={0: negative, 1: positive, "2": neutral}'])
    assert cfg.data.labels.map == {"0": "negative", "1": "positive", "2": "neutral"}


def test_later_overrides_win_and_merge():
    cfg = load_config(None, ["training.rounds=5", "training.rounds=6"])
    assert cfg.training.rounds == 6
    cfg = load_config(None, ["privacy.orgs={a: {target_epsilon: 2}}", "privacy.orgs.a.delta=1.0e-7"])
    assert cfg.privacy.orgs == {"a": OrgPrivacyConfig(target_epsilon=2.0, delta=1e-7)}
    cfg = load_config(None, ["model.lora.target_modules=[query]", "model.lora.target_modules=[key, value]"])
    assert cfg.model.lora.target_modules == ["key", "value"]


def test_user_file_layers_over_default(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("training:\n  rounds: 7\nprivacy:\n  target_epsilon: 3\n", encoding="utf-8")
    cfg = load_config(path)
    assert cfg.training.rounds == 7
    assert cfg.privacy.target_epsilon == 3.0
    # everything else comes from the packaged default.yaml (not just the dataclass defaults)
    default = load_config()
    assert cfg.training.batch_size == default.training.batch_size
    assert cfg.data.max_examples is None  # the demo uses every BBC article
    assert (cfg.training.batch_size, cfg.training.local_epochs, cfg.data.max_length) == (64, 2, 64)
    assert cfg.partitioning.scheme == "dirichlet"
    assert cfg.training.learning_rate == default.training.learning_rate
    assert (
        dataclasses.replace(
            cfg,
            training=dataclasses.replace(cfg.training, rounds=default.training.rounds),
            privacy=dataclasses.replace(cfg.privacy, target_epsilon=default.privacy.target_epsilon),
        )
        == default
    )
    # and overrides win over the file
    assert load_config(path, ["training.rounds=9"]).training.rounds == 9


def test_empty_user_file_is_the_default(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n", encoding="utf-8")
    assert load_config(path) == load_config()


def test_relative_data_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    path = conf_dir / "reviews.yaml"
    path.write_text(
        "data:\n  source: file\n  path: data/drugs.csv\n  test_path: ../held/test.tsv\n",
        encoding="utf-8",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(Path("..") / "conf" / "reviews.yaml")
    assert Path(cfg.data.path) == (conf_dir / "data" / "drugs.csv").resolve()
    assert Path(cfg.data.test_path).resolve() == (tmp_path / "held" / "test.tsv").resolve()
    # an absolute path is kept; a path given as an override stays as typed (relative to the cwd)
    absolute = tmp_path / "abs.csv"
    path.write_text(f"data:\n  source: file\n  path: {absolute}\n", encoding="utf-8")
    assert load_config(path).data.path == str(absolute)
    assert load_config(path, ["data.path=x/y.csv"]).data.path == "x/y.csv"


# --------------------------------------------------------------------------- validation errors


@pytest.mark.parametrize(
    "overrides, names",
    [
        # unknown keys, top level and nested: the full dotted key is named
        (["bogus=1"], "'bogus'"),
        (["training.epochs=2"], "training.epochs"),
        (["model.lora.rank=4"], "model.lora.rank"),
        (["simulation.client_resources.gpus=1"], "simulation.client_resources.gpus"),
        (["privacy.orgs={org-1: {epsilon: 2}}"], "privacy.orgs.org-1.epsilon"),
        (["strategy.fedadam.eta_g=1.0"], "strategy.fedadam.eta_g"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_unknown_keys(overrides, names):
    message = overrides_error(*overrides, names=names)
    assert "unknown key" in message


@pytest.mark.parametrize(
    "override, key",
    [
        ("training.rounds=abc", "training.rounds"),  # string for int
        ("training.rounds=true", "training.rounds"),  # bool for int
        ("training.rounds=2.5", "training.rounds"),  # float for int
        ("training.batch_size=32.0", "training.batch_size"),  # float for int, even if integral
        ("training.learning_rate=[1, 2]", "training.learning_rate"),  # list for scalar
        ("privacy.target_epsilon=eight", "privacy.target_epsilon"),  # string for float
        ("privacy.delta=false", "privacy.delta"),  # bool for float
        ("privacy.enabled=1", "privacy.enabled"),  # int for bool
        ("privacy.enabled=yes please", "privacy.enabled"),
        ("data.text_column=true", "data.text_column"),  # bool for a name or a column number
        ("data.text_column={a: 1}", "data.text_column"),  # mapping for str
        ("data.max_examples=lots", "data.max_examples"),  # optional int
        ("data.labels.names=positive", "data.labels.names"),  # string for list
        ("model.lora.target_modules=query", "model.lora.target_modules"),
        ("model.lora.target_modules=[query, 3]", "model.lora.target_modules[1]"),
        ("model.lora=5", "model.lora"),  # mapping expected (section)
        ("training=5", "training"),
        ("data.labels.map=[a, b]", "data.labels.map"),  # mapping expected (field)
        ("data.labels.map={a: [1]}", "data.labels.map.a"),
        ("data.labels.ranges={neg: low}", "data.labels.ranges.neg"),
        ("privacy.orgs=[org-1]", "privacy.orgs"),
        ("privacy.orgs={org-1: 2}", "privacy.orgs.org-1"),
        ("privacy.orgs={org-1: {target_epsilon: high}}", "privacy.orgs.org-1.target_epsilon"),
        ("run.out_dir=[a]", "run.out_dir"),
    ],
)
def test_wrong_types(override, key):
    message = overrides_error(override, names=key)
    assert "expected" in message


@pytest.mark.parametrize(
    "override, key",
    [
        ("training.rounds=0", "training.rounds"),
        ("training.rounds=-3", "training.rounds"),
        ("training.batch_size=0", "training.batch_size"),
        ("training.learning_rate=0", "training.learning_rate"),
        ("training.weight_decay=-0.1", "training.weight_decay"),
        ("privacy.delta=0", "privacy.delta"),
        ("privacy.delta=1", "privacy.delta"),
        ("privacy.delta=1.5", "privacy.delta"),
        ("privacy.target_epsilon=0", "privacy.target_epsilon"),
        ("privacy.target_epsilon=-1", "privacy.target_epsilon"),
        ("privacy.max_grad_norm=0", "privacy.max_grad_norm"),
        ("data.test_fraction=1.0", "data.test_fraction"),
        ("data.test_fraction=0", "data.test_fraction"),
        ("data.max_examples=0", "data.max_examples"),
        ("data.max_length=4", "data.max_length"),
        ("strategy.fraction_train=0", "strategy.fraction_train"),
        ("strategy.fraction_train=1.5", "strategy.fraction_train"),
        ("strategy.fraction_evaluate=-0.1", "strategy.fraction_evaluate"),
        ("strategy.fedadam.beta_1=2", "strategy.fedadam.beta_1"),
        ("simulation.client_resources.num_gpus=-0.5", "simulation.client_resources.num_gpus"),
        ("simulation.client_resources.num_cpus=0", "simulation.client_resources.num_cpus"),
        ("partitioning.num_orgs=0", "partitioning.num_orgs"),
        ("partitioning.alpha=0", "partitioning.alpha"),
        ("model.lora.dropout=1.0", "model.lora.dropout"),
        ("output.keep_checkpoints=-1", "output.keep_checkpoints"),
        ("training.device=gpu", "training.device"),
        ("training.device=cuda:x", "training.device"),  # would crash int() when CUDA is present
        ("training.device=cuda:-1", "training.device"),
        ("run.seed=-1", "run.seed"),  # numpy refuses negative seeds: a traceback mid-partitioning
        ("run.seed=18446744073709551616", "run.seed"),
        ("model.init_seed=18446744073709551616", "model.init_seed"),  # torch.manual_seed overflows
        # non-finite numbers are not "a number > 0": epsilon inf means no privacy at all
        ("privacy.target_epsilon=.inf", "privacy.target_epsilon"),
        ("privacy.target_epsilon=.nan", "privacy.target_epsilon"),
        ("privacy.max_grad_norm=.inf", "privacy.max_grad_norm"),
        ("training.learning_rate=.inf", "training.learning_rate"),
        ("privacy.orgs={org-1: {target_epsilon: .inf}}", "privacy.orgs.org-1.target_epsilon"),
        # an integer too large for a float must be an error, not an OverflowError
        ("privacy.target_epsilon=" + "9" * 400, "privacy.target_epsilon"),
    ],
)
def test_out_of_range(override, key):
    overrides_error(override, names=key)


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.finetuning=qlora", "model.finetuning"),
        ("privacy.accountant=gdp", "privacy.accountant"),
        ("privacy.grad_sample_mode=functorch", "privacy.grad_sample_mode"),
        ("partitioning.scheme=kmeans", "partitioning.scheme"),
        ("strategy.name=fedyogi", "strategy.name"),
        ("strategy.name=FedAvg", "strategy.name"),
        ("training.optimizer=adam", "training.optimizer"),
        ("data.format=xlsx", "data.format"),
    ],
)
def test_literal_mismatch(override, key):
    message = overrides_error(override, names=key)
    assert "one of" in message


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["data.source=file"], "data.path"),
        (["partitioning.scheme=natural"], "partitioning.column"),
        (["data.labels.map={a: b}", "data.labels.ranges={x: [1, 2]}"], "data.labels"),
        (["data.labels.ranges={neg: [5, 1]}"], "data.labels.ranges.neg"),
        (["data.labels.ranges={neg: [1]}"], "data.labels.ranges.neg"),
        (["data.labels.ranges={neg: [1, 2, 3]}"], "data.labels.ranges.neg"),
        (["model.lora.target_modules=[]"], "model.lora.target_modules"),
        (["strategy.min_train_nodes=5"], "strategy.min_train_nodes"),
        (["partitioning.num_orgs=1"], "strategy.min_train_nodes"),
        (["privacy.orgs={org-1: {target_epsilon: 0}}"], "privacy.orgs.org-1.target_epsilon"),
        (["privacy.orgs={org-1: {target_epsilon: -2}}"], "privacy.orgs.org-1.target_epsilon"),
        (["privacy.orgs={org-1: {delta: 1}}"], "privacy.orgs.org-1.delta"),
        (["privacy.orgs={org-1: {delta: 0}}"], "privacy.orgs.org-1.delta"),
    ],
)
def test_cross_field_rules(overrides, key):
    overrides_error(*overrides, names=key)


def test_cross_field_rules_allow_valid_combinations():
    cfg = load_config(None, ["model.finetuning=full", "model.lora.target_modules=[]"])
    assert cfg.model.lora.target_modules == []
    cfg = load_config(
        None, ["data.source=file", "data.path=x.csv", "partitioning.scheme=natural", "partitioning.column=c"]
    )
    assert cfg.partitioning.column == "c"
    assert load_config(None, ["data.labels.ranges={a: [1, 1]}"]).data.labels.ranges == {"a": [1.0, 1.0]}
    assert load_config(None, ["strategy.min_train_nodes=4"]).strategy.min_train_nodes == 4


@pytest.mark.parametrize(
    "override, names",
    [
        ("training.rounds", "training.rounds"),  # no '='
        ("=5", "'=5'"),  # no key
        ("a..b=1", "a..b"),  # empty key part
        (".rounds=1", ".rounds"),
        ("training.=1", "training."),
        ("training.rounds=[1, 2", "training.rounds"),  # value is not YAML
        ("training.rounds={a: ", "training.rounds"),
        ("training.rounds=!!python/object:os.system x", "training.rounds"),  # unsafe YAML tag
    ],
)
def test_malformed_overrides(override, names):
    config_error(parse_overrides, [override], names=names)
    overrides_error(override, names=names)


def test_override_value_under_a_scalar():
    overrides_error("training=5", "training.rounds=3", names="training")


def test_config_file_not_found(tmp_path):
    missing = tmp_path / "missing.yaml"
    message = config_error(load_config, missing, names=str(missing))
    assert "not found" in message


@pytest.mark.parametrize(
    "text, expect",
    [
        ("training: [rounds: 3\n", "not valid YAML"),
        ("training:\n  rounds: 3\n bad indent: 1\n", "not valid YAML"),
        ("- training\n- privacy\n", "mapping"),
        ("just a string\n", "mapping"),
        ("42\n", "mapping"),
    ],
)
def test_config_file_not_a_yaml_mapping(tmp_path, text, expect):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    message = config_error(load_config, path, names=str(path))
    assert expect in message


def test_config_file_unreadable(tmp_path):
    config_error(load_config, tmp_path, names=str(tmp_path))  # a directory
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    config_error(load_config, path, names=str(path))


def test_errors_in_a_config_file_name_the_key(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("training:\n  rounds: 3\n  epochs: 2\n", encoding="utf-8")
    config_error(load_config, path, names="training.epochs")
    path.write_text("privacy:\n  delta: 2\n", encoding="utf-8")
    config_error(load_config, path, names="privacy.delta")


def test_config_error_is_a_user_error():
    assert issubclass(ConfigError, UserError) and ConfigError.exit_code == 2


@pytest.mark.parametrize(
    "raw, names",
    [
        ([1, 2], "<top level>"),
        ({"bogus\nkey": 1}, "bogus"),  # a key with a line break is shown escaped, on one line
        ({"privacy": {"orgs": {"org\n1": {"target_epsilon": 0}}}}, "privacy.orgs.org"),
        ({"data": {"labels": {"ranges": {"a\u2028b": [2, 1]}}}}, "data.labels.ranges.a"),
        ({"training": {"rounds": "3\n4"}}, "training.rounds"),
    ],
)
def test_config_from_dict_errors(raw, names):
    config_error(config_from_dict, raw, names=names)


# --------------------------------------------------------------------------- round trips


def test_json_round_trip():
    cfg = load_config(
        None,
        [
            "privacy.orgs={org-1: {target_epsilon: 2}, org-2: {delta: 1.0e-7}}",
            "data.labels.ranges={negative: [1, 4], positive: [7, 10]}",
            "data.labels.names=[negative, positive]",
            "model.lora.target_modules=[query, key, value]",
            "training.device=cuda:1",
            "run.out_dir=runs/x",
        ],
    )
    again = config_from_json(cfg.to_json())
    assert again == cfg
    assert again.to_json() == cfg.to_json()
    assert config_from_json(load_config().to_json()) == load_config()
    assert config_from_json(FedPrivConfig().to_json()) == FedPrivConfig()


def test_target_for_applies_per_org_overrides():
    cfg = load_config(None, ["privacy.orgs={org-1: {target_epsilon: 2}, org-2: {delta: 1.0e-7}}"])
    assert cfg.privacy.target_for("org-1") == (2.0, 1e-5)
    assert cfg.privacy.target_for("org-2") == (8.0, 1e-7)
    assert cfg.privacy.target_for("org-3") == (8.0, 1e-5)
    cfg = load_config(None, ["privacy.target_epsilon=3", "privacy.delta=1.0e-6"])
    assert cfg.privacy.target_for("org-0") == (3.0, 1e-6)


def test_budget_for_is_max_epsilon_else_the_target():
    cfg = load_config(
        None, ["privacy.max_epsilon=10", "privacy.orgs={org-1: {max_epsilon: 12}, org-2: {target_epsilon: 3}}"]
    )
    assert [cfg.privacy.budget_for(o) for o in ("org-0", "org-1", "org-2")] == [10.0, 12.0, 10.0]
    assert load_config().privacy.budget_for("org-0") == 8.0  # no budget given: the target


@pytest.mark.parametrize(
    ("override", "where"),
    [
        ("privacy.max_epsilon=4", "config: privacy.max_epsilon: 4.0 is below target_epsilon 8.0"),
        ("privacy.orgs={org-1: {max_epsilon: 2}}", "config: privacy.orgs.org-1.max_epsilon: 2.0 is below"),
        ("privacy.max_epsilon=-1", "privacy.max_epsilon"),
    ],
)
def test_a_budget_below_the_target_is_refused_in_one_line(override, where):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert where in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- property: junk never crashes


_LITERALS = [
    "lora", "full", "file", "natural", "iid", "dirichlet", "rdp", "prv", "hooks", "ghost",
    "fedavg", "fedprox", "fedadam", "adamw", "sgd", "auto", "cpu", "cuda", "cuda:0", "cuda:", "csv", "query",
]  # fmt: skip
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-3, max_value=10),
    st.floats(),
    st.floats(min_value=0, max_value=2),
    st.text(max_size=6),
    st.sampled_from(_LITERALS),
    st.sampled_from([10**400, -(10**400), 2**64, float("inf"), float("-inf"), float("nan"), "1e-6", "a\nb"]),
)
_KEYS = st.one_of(
    st.text(max_size=6),
    st.sampled_from(["org-1", "a", "1", "line\nbreak", "sep\u2028arator", "tab\tkey"]),
    st.integers(),
    st.booleans(),
    st.none(),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=3),
    max_leaves=8,
)


def _junk_for(cls) -> st.SearchStrategy:
    """Dicts whose keys are mostly the real schema's (recursing into sections), with values of any type."""
    hints = typing.get_type_hints(cls)

    def value_for(name: str) -> st.SearchStrategy:
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            return st.one_of(_junk_for(tp), _VALUES)
        if name == "orgs":
            return st.one_of(
                st.dictionaries(_KEYS, st.one_of(_junk_for(OrgPrivacyConfig), _VALUES), max_size=3), _VALUES
            )
        if name == "ranges":
            return st.one_of(st.dictionaries(_KEYS, st.lists(_SCALARS, max_size=3), max_size=3), _VALUES)
        return _VALUES

    items = [st.tuples(st.just(f.name), st.deferred(lambda n=f.name: value_for(n))) for f in dataclasses.fields(cls)]
    items.append(st.tuples(_KEYS, _VALUES))
    return st.lists(st.one_of(items), max_size=6).map(dict)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.one_of(_junk_for(FedPrivConfig), _VALUES))
def test_junk_either_loads_or_raises_config_error(raw):
    try:
        cfg = config_from_dict(raw)
    except ConfigError as exc:
        message = str(exc)
        assert message.strip() and len(message.splitlines()) == 1, repr(message)
        return
    assert isinstance(cfg, FedPrivConfig)
    assert config_from_json(cfg.to_json()) == cfg


def test_organisation_level_dp_cannot_be_combined_with_secure_aggregation():
    with pytest.raises(ConfigError, match="client_dp.enabled: the coordinator clips each organisation's update"):
        load_config(None, ["client_dp.enabled=true", "secure_aggregation.enabled=true"])
    adaptive = ["client_dp.enabled=true", "client_dp.clipping=adaptive", "client_dp.clipped_count_stddev=1"]
    assert load_config(None, adaptive).client_dp.clipping == "adaptive"


def test_organisation_level_dp_refuses_what_it_cannot_account_for():
    # adaptive clipping's noised count: 4 organisations / 20 = 0.2 is too little noise for noise_multiplier 1
    with pytest.raises(ConfigError, match=r"^config: client_dp\.clipped_count_stddev: 0\.2 \(default: 4 organisations"):
        load_config(None, ["client_dp.enabled=true", "client_dp.clipping=adaptive"])
    # robust strategies would need each organisation's update, the coordinator releases only their noised sum
    with pytest.raises(ConfigError, match=r"^config: strategy\.name: krum compares the organisations' individual"):
        load_config(None, ["client_dp.enabled=true", "strategy.name=krum"])


# --------------------------------------------------------------------------- duplicate keys (issue 27)


def test_a_key_given_twice_in_a_config_file_is_refused_with_both_lines(tmp_path):
    """YAML lets the last one win silently (``rounds: 2`` then ``rounds: 7`` planned 7 rounds)."""
    path = tmp_path / "cfg.yaml"
    path.write_text("training:\n  rounds: 2\n  batch_size: 8\n  rounds: 7\n", encoding="utf-8")
    config_error(load_config, path, names=(str(path), "'training.rounds'", "lines 2 and 4"))
    path.write_text("run:\n  seed: 1\nmodel:\n  name: tiny\nrun:\n  name: x\n", encoding="utf-8")
    config_error(load_config, path, names=(str(path), "'run'", "lines 1 and 5"))
    # inside a list of mappings and a flow mapping; 1 and "1" are different keys, anchors are walked once
    path.write_text('data:\n  labels:\n    map: {"1": a, 1: b, x: c, x: d}\n', encoding="utf-8")
    config_error(load_config, path, names=("'data.labels.map.x'", "line 3"))
    path.write_text("a: &anchor {b: 1}\nc: *anchor\nd: [{e: 1}, {e: 2, f: 3, e: 4}]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"key 'd\[1\]\.e' is given twice \(line 3\)"):
        load_config(path)


def test_a_key_given_twice_in_an_override_value_is_refused():
    overrides_error("privacy.orgs={org-1: {target_epsilon: 2}, org-1: {target_epsilon: 9}}", names="'org-1'")


def test_a_key_given_twice_in_a_federation_file_is_refused(tmp_path):
    from fedpriv.commands.provisioning.federation import load_federation
    from tests.fedpriv.commands.provisioning.conftest import federation_dict

    text = yaml.safe_dump(federation_dict(), sort_keys=False)
    line = text.splitlines().index("coordinator:") + 1
    path = tmp_path / "FEDERATION.yaml"
    path.write_text(text + "coordinator:\n  port: 1\n", encoding="utf-8")
    last = len(text.splitlines()) + 1
    message = config_error(load_federation, path, names=(str(path), "'coordinator'", f"lines {line} and {last}"))
    assert message.startswith("federation file")


def test_an_absurd_learning_rate_is_refused_but_a_large_one_is_not():
    """1e300 passed and then failed in torch's optimizer (16 tracebacks); float32 weights bound a step."""
    overrides_error("training.learning_rate=1e300", names=("training.learning_rate", "3.4e38"))
    overrides_error("training.learning_rate=-1e-3", names="training.learning_rate")
    assert load_config(None, ["training.learning_rate=1e30"]).training.learning_rate == 1e30
