"""Typed YAML, the machinery every config file shares: safe reading, duplicate keys, dataclasses, overrides."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from fedpriv.kernel.typed_yaml import (
    DuplicateKeyError,
    build_dataclass,
    deep_merge,
    field_check,
    load_yaml,
    parse_overrides,
    positive_check,
    read_yaml,
    shown,
)
from tests.fedpriv.kernel.one_line_errors import config_error


@dataclass(frozen=True)
class Inner:
    size: int = field(default=1, metadata=positive_check("an integer > 0"))
    names: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    rate: float | None = None
    mode: str = field(default="a", metadata=field_check(lambda v: v in ("a", "b"), "a or b"))
    inner: Inner = field(default_factory=Inner)


def test_parse_overrides_nests_keys():
    assert parse_overrides(["a.b.c=1", "a.b.d=x", "e=[1, 2]", "f="]) == {
        "a": {"b": {"c": 1, "d": "x"}},
        "e": [1, 2],
        "f": None,
    }


def test_any_frozen_dataclass_is_built_with_defaults_conversions_and_checks():
    assert build_dataclass(Outer, None) == Outer()
    built = build_dataclass(Outer, {"rate": 1, "inner": {"size": 3, "names": ["p"]}})
    assert built == Outer(rate=1.0, inner=Inner(size=3, names=["p"])) and type(built.rate) is float
    config_error(build_dataclass, Outer, {"inner": {"size": 0}}, names=("inner.size", "an integer > 0"))
    config_error(build_dataclass, Outer, {"mode": "c"}, names=("mode", "a or b"))
    config_error(build_dataclass, Outer, {"inner": {"names": [1]}}, names="inner.names[0]")
    config_error(build_dataclass, Outer, {"rate": float("inf")}, names=("rate", "a number or null"))
    message = config_error(build_dataclass, Outer, {"inner": {"sise": 2}}, names=("'inner.sise'", "names, size"))
    assert message.startswith("config: unknown key")
    config_error(build_dataclass, Outer, {"bad\nkey": 1}, names="bad\\nkey")  # shown escaped, on one line


def test_yaml_is_read_safely_with_user_floats_and_no_key_twice():
    assert load_yaml("a: 1e-6\nb: [1, x]\n") == {"a": 1e-6, "b": [1, "x"]}
    assert load_yaml("") is None
    with pytest.raises(DuplicateKeyError, match=r"key 'a\.b' is given twice \(lines 2 and 3\)"):
        load_yaml("a:\n  b: 1\n  b: 2\n")
    with pytest.raises(Exception, match="python/object"):
        load_yaml("!!python/object:os.system x")


def test_a_yaml_file_is_its_mapping_or_one_line_naming_the_file(tmp_path):
    path = tmp_path / "f.yaml"
    path.write_text("a: {b: 1}\n", encoding="utf-8")
    assert read_yaml(path) == {"a": {"b": 1}}
    path.write_text("", encoding="utf-8")
    assert read_yaml(path) == {}
    path.write_text("- 1\n", encoding="utf-8")
    config_error(read_yaml, path, names=(f"config file {path}", "mapping"))
    path.write_text("a: [1\n", encoding="utf-8")
    config_error(read_yaml, path, names=(str(path), "not valid YAML at line"))
    config_error(read_yaml, tmp_path / "missing.yaml", names=("missing.yaml", "not found"))


def test_layers_merge_mappings_and_replace_the_rest():
    base = {"a": {"b": 1, "c": [1]}, "d": 1}
    assert deep_merge(base, {"a": {"c": [2]}, "d": {"e": 1}}) == {"a": {"b": 1, "c": [2]}, "d": {"e": 1}}
    assert base == {"a": {"b": 1, "c": [1]}, "d": 1}  # neither layer is changed


def test_names_are_shown_on_one_line():
    assert shown("plain name") == "plain name"
    assert shown("two\nlines") == "two\\nlines" and shown("sep\u2028arator") == "sep\\u2028arator"
