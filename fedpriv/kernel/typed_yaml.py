"""Typed YAML: YAML read safely, then turned into frozen dataclasses with one-line errors.

The machinery every fedpriv config file shares (the run config, an organisation's ``node.yaml``, the
coordinator's FEDERATION.yaml), so that a mistake in any of them reads the same way: one line naming the
file and the dotted key. A YAML key given twice is refused (YAML would keep the last one silently).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from fedpriv.kernel.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but ``1e-6`` is a float (YAML 1.1 needs a dot: ``1.0e-6``), as users write it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)

# what PyYAML itself can raise on odd input: a bad document, an int over Python's digit limit, deep nesting
YAML_ERRORS = (yaml.YAMLError, ValueError, RecursionError)


class DuplicateKeyError(yaml.YAMLError):
    """A mapping that gives one key twice: YAML lets the last one win silently, a config must not."""

    def __init__(self, key: str, first_line: int, second_line: int):
        lines = f"line {first_line}" if first_line == second_line else f"lines {first_line} and {second_line}"
        super().__init__(f"key '{key}' is given twice ({lines}); keep one (YAML would silently use the last)")
        self.key, self.first_line, self.second_line = key, first_line, second_line


def _refuse_duplicate_keys(root: yaml.Node) -> None:
    """Walk the composed document in order; raise :class:`DuplicateKeyError` naming the dotted key and its lines."""
    walked: set[int] = set()  # anchors and aliases share (or even nest) nodes: each is walked once
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, where = stack.pop()
        if id(node) in walked:
            continue
        walked.add(id(node))
        children: list[tuple[yaml.Node, str]] = []
        if isinstance(node, yaml.SequenceNode):
            children = [(item, f"{where}[{i}]") for i, item in enumerate(node.value)]
        elif isinstance(node, yaml.MappingNode):
            lines: dict[tuple[str, str], int] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    children.append((value_node, where))  # a merge (<<) or a complex key: no dotted name to give
                    continue
                dotted = f"{where}.{shown(key_node.value)}" if where else shown(key_node.value)
                line = key_node.start_mark.line + 1
                identity = (key_node.tag, key_node.value)  # 1 and "1" are different keys, as YAML constructs them
                if identity in lines:
                    raise DuplicateKeyError(dotted, lines[identity], line)
                lines[identity] = line
                children.append((value_node, dotted))
        stack.extend(reversed(children))


def load_yaml(text: str) -> Any:
    """``yaml.load`` with :class:`_Loader` (a SafeLoader: no arbitrary objects), refusing duplicate keys."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def shown(key: Any) -> str:
    """A key or name as it goes into a one-line message: line breaks and other control characters escaped."""
    text = str(key)
    return text if text.isprintable() else repr(text)[1:-1]


def field_check(predicate, expected: str):
    """Attach a range check to a field: ``field(metadata=field_check(lambda v: v > 0, "> 0"))``."""
    return {"check": predicate, "expected": expected}


def positive_check(expected="a number > 0"):
    """A field check: the value is > 0."""
    return field_check(lambda v: v > 0, expected)


def fraction_check(expected="a number in [0, 1]"):
    """A field check: the value is in [0, 1]."""
    return field_check(lambda v: 0.0 <= v <= 1.0, expected)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(value: Any, tp, key: str) -> Any:
    """Convert a YAML value to ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"config: {key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"config: {key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config: {key}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config: {key}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _convert(v, val_tp, f"{key}.{shown(k)}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int too large for a float
                number = math.inf
            if math.isfinite(number):
                return number
            raise ConfigError(f"config: {key}: expected a finite number, got {value!r}")
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config: {key}: expected {_type_name(tp)}, got {value!r}")


def build_dataclass(cls, raw: Any, prefix: str = ""):
    """The frozen dataclass ``cls`` from a mapping: unknown keys, wrong types and failed field checks raise one
    ConfigError line naming the dotted key (``prefix`` names where ``raw`` sits; missing keys keep the defaults)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config: {prefix or '<top level>'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            where = f"{prefix}.{shown(key)}" if prefix else shown(key)
            raise ConfigError(f"config: unknown key '{where}' (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        key = f"{prefix}.{name}" if prefix else name
        value = _convert(raw[name], hints[name], key)
        check = f.metadata.get("check")
        if check is not None and value is not None and not check(value):
            raise ConfigError(f"config: {key}: expected {f.metadata['expected']}, got {raw[name]!r}")
        kwargs[name] = value
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``a.b=1`` strings into a nested dict; values are YAML scalars/lists."""
    nested: dict[str, Any] = {}
    for item in overrides:
        given = shown(item)
        if "=" not in item:
            raise ConfigError(f"override '{given}': expected key=value, for example training.rounds=5")
        key, _, text = item.partition("=")
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{given}': expected a dotted key such as training.rounds")
        try:
            value = load_yaml(text) if text.strip() else None
        except DuplicateKeyError as exc:
            raise ConfigError(f"override '{given}': {exc}") from None
        except YAML_ERRORS:
            raise ConfigError(f"override '{given}': value is not valid YAML") from None
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            existing = node.setdefault(part, {})
            if not isinstance(existing, dict):
                raise ConfigError(f"override '{given}': '{shown(part)}' is set to a value and cannot have sub-keys")
            node = existing
        node[parts[-1]] = value
    return nested


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` layered over ``base``: mappings merge key by key, anything else in ``extra`` replaces."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file's top-level mapping ({} for an empty file); any problem is one ConfigError naming the file."""
    name = shown(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {name}: not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {name}: cannot be read ({exc.__class__.__name__})") from None
    try:
        raw = load_yaml(text)
    except DuplicateKeyError as exc:
        raise ConfigError(f"config file {name}: {exc}") from None
    except YAML_ERRORS as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {name}: not valid YAML{where}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {name}: expected a mapping at the top level")
    return raw
