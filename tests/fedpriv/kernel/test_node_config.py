"""An organisation's node.yaml: its budget, redaction on by default, paths relative to it, duplicate keys."""

from __future__ import annotations

import pytest

from fedpriv.kernel.config import RedactionConfig, load_config
from fedpriv.kernel.errors import ConfigError
from fedpriv.kernel.node_config import load_node_config
from tests.fedpriv.kernel.one_line_errors import config_error


def test_node_yaml_budget_defaults_to_its_target_and_must_not_be_lower(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\na,b\n")
    path = tmp_path / "node.yaml"
    path.write_text("org: lab\ndata: {path: d.csv}\nprivacy: {target_epsilon: 3}\n")
    node = load_node_config(path)
    assert node.privacy.budget == 3.0 and node.ledger_key == str(tmp_path / "ledger.key")
    path.write_text("org: lab\ndata: {path: d.csv}\nprivacy: {target_epsilon: 3, max_epsilon: 2}\n")
    with pytest.raises(ConfigError, match=r"node\.yaml.*privacy\.max_epsilon: 2\.0 is below target_epsilon 3"):
        load_node_config(path)


def test_node_yaml_redacts_by_default_and_its_names_file_is_relative_to_it(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\na,b\n")
    path = tmp_path / "node.yaml"
    path.write_text("org: lab\ndata: {path: d.csv}\n")
    node = load_node_config(path)
    assert node.redaction.enabled and node.redaction.kinds == list(RedactionConfig().kinds)
    assert not load_config().redaction.enabled  # simulations of public corpora: off unless asked for
    path.write_text("org: lab\ndata: {path: d.csv}\nredaction: {extra_names: staff.txt, locales: [uk]}\n")
    with pytest.raises(ConfigError, match=r"node\.yaml: redaction\.extra_names: .*staff\.txt is not a file"):
        load_node_config(path)
    (tmp_path / "staff.txt").write_text("Ann Lee\n")
    node = load_node_config(path)
    assert node.redaction.extra_names == str(tmp_path / "staff.txt") and node.redaction.locales == ["uk"]
    path.write_text("org: lab\ndata: {path: d.csv}\nredaction: {kinds: [mail]}\n")
    with pytest.raises(ConfigError, match=r"node\.yaml: redaction\.kinds: expected a non-empty list"):
        load_node_config(path)


def test_a_key_given_twice_in_a_node_config_is_refused(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text(
        "org: clinic-a\ndata: {path: notes.csv}\nprivacy:\n  target_epsilon: 1\n  delta: 1.0e-6\n"
        "  target_epsilon: 50\n",
        encoding="utf-8",
    )
    config_error(load_node_config, path, names=(str(path), "'privacy.target_epsilon'", "lines 4 and 6"))
