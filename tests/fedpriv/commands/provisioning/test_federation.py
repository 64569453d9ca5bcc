"""FEDERATION.yaml: typed and validated in one place; every mistake is one line naming the file and the key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from fedpriv.commands.provisioning.federation import load_federation
from fedpriv.kernel.errors import ConfigError

from .conftest import federation_dict, write_federation


def _error(path: Path, *names: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_federation(path)
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    assert str(path) in message, f"file not named in {message!r}"
    for name in names:
        assert name in message, f"{name!r} not named in {message!r}"
    return message


def test_example_loads_into_typed_config(federation_file: Path):
    cfg = load_federation(federation_file)
    assert cfg.federation == "clinics-2026"
    assert cfg.coordinator.port == 9092
    assert [o.name for o in cfg.organisations] == ["hospital-a", "hospital-b"]
    a, b = cfg.organisations
    assert a.privacy.target_epsilon == 8.0 and a.privacy.delta == 1e-5
    assert a.data.source == "file" and a.data.path == "/data/hospital-a/notes.csv"
    assert b.privacy.target_epsilon == 3.0 and b.device == "auto"
    # loopback is always a SAN: the SuperLink's own SuperExec dials 127.0.0.1 over TLS
    assert cfg.san_addresses == ["coordinator.example.org", "10.0.0.5", "127.0.0.1", "localhost"]
    assert cfg.dial_address == "coordinator.example.org:9092"
    with pytest.raises(AttributeError):
        cfg.federation = "other"  # frozen


def _mutate(fn):
    raw = copy.deepcopy(federation_dict())
    fn(raw)
    return raw


BAD = {
    "unknown-key": (lambda r: r["coordinator"].update(prot=1), ("coordinator.prot",)),
    "unknown-org-key": (lambda r: r["organisations"][0].update(epsilon=1), ("organisations[0].epsilon",)),
    "no-organisations": (lambda r: r.update(organisations=[]), ("organisations",)),
    "organisations-missing": (lambda r: r.pop("organisations"), ("organisations",)),
    "duplicate-org": (
        lambda r: r["organisations"][1].update(name="hospital-a"),
        ("organisations[1].name", "duplicate"),
    ),
    "bad-org-name": (lambda r: r["organisations"][0].update(name="../etc"), ("organisations[0].name",)),
    "org-named-coordinator": (lambda r: r["organisations"][0].update(name="coordinator"), ("organisations[0].name",)),
    "bad-address": (lambda r: r["coordinator"].update(addresses=["not an address"]), ("coordinator.addresses",)),
    "bad-ip": (lambda r: r["coordinator"].update(addresses=["10.0.0.256"]), ("coordinator.addresses",)),
    "no-addresses": (lambda r: r["coordinator"].update(addresses=[]), ("coordinator.addresses",)),
    "port-zero": (lambda r: r["coordinator"].update(port=0), ("coordinator.port",)),
    "port-too-big": (lambda r: r["coordinator"].update(port=70000), ("coordinator.port",)),
    "port-not-int": (lambda r: r["coordinator"].update(port="9092"), ("coordinator.port",)),
    "validity-zero": (lambda r: r["validity_days"].update(server=0), ("validity_days.server",)),
    "validity-negative": (lambda r: r["validity_days"].update(ca=-5), ("validity_days.ca",)),
    "epsilon-zero": (
        lambda r: r["organisations"][0]["privacy"].update(target_epsilon=0),
        ("organisations[0].privacy.target_epsilon",),
    ),
    "epsilon-negative": (
        lambda r: r["organisations"][1]["privacy"].update(target_epsilon=-1),
        ("organisations[1].privacy.target_epsilon",),
    ),
    "delta-one": (lambda r: r["organisations"][0]["privacy"].update(delta=1), ("organisations[0].privacy.delta",)),
    "no-data-path": (
        lambda r: r["organisations"][0].update(data={"text_column": "t"}),
        ("organisations[0].data.path",),
    ),
    "bad-device": (lambda r: r["organisations"][0].update(device="tpu"), ("organisations[0].device",)),
    "bad-federation-name": (lambda r: r.update(federation="a b"), ("federation",)),
    "empty-database": (lambda r: r["coordinator"].update(database=" "), ("coordinator.database", "a file path")),
    "control-address": (
        lambda r: r["coordinator"].update(control_address="127.0.0.1:9093"),
        ("coordinator.control_address", "Control API"),
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_federation_is_one_line_naming_file_and_key(tmp_path: Path, case: str):
    mutate, names = BAD[case]
    path = write_federation(tmp_path / "FEDERATION.yaml", _mutate(mutate))
    _error(path, *names)


def test_missing_file(tmp_path: Path):
    assert "not found" in _error(tmp_path / "nope.yaml")


def test_not_yaml(tmp_path: Path):
    path = tmp_path / "FEDERATION.yaml"
    path.write_text("federation: [unclosed\n  - x: {", encoding="utf-8")
    assert "not valid YAML" in _error(path)


def test_not_a_mapping(tmp_path: Path):
    path = tmp_path / "FEDERATION.yaml"
    path.write_text("- just\n- a list\n", encoding="utf-8")
    _error(path, "mapping")
