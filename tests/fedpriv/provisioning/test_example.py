"""The FEDERATION.yaml shipped in examples/ stays valid and provisions complete kits."""

from __future__ import annotations

from pathlib import Path

from fedpriv.config import load_node_config
from fedpriv.provisioning.federation import load_federation
from fedpriv.provisioning.kits import provision

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "FEDERATION.yaml"


def test_shipped_example_provisions_every_party(tmp_path):
    federation = load_federation(EXAMPLE)
    provision(federation, tmp_path / "kits", make_org_keys=True)
    orgs = [org.name for org in federation.organisations]
    assert orgs == ["hospital-a", "hospital-b"]
    for org in orgs:
        node = load_node_config(tmp_path / "kits" / org / "node.yaml")
        assert node.org == org and (tmp_path / "kits" / org / "node.key").stat().st_mode & 0o777 == 0o600
        assert not (tmp_path / "kits" / org / "ca.key").exists()
    assert load_node_config(tmp_path / "kits" / "hospital-b" / "node.yaml").privacy.target_epsilon == 3.0
    assert (tmp_path / "kits" / "coordinator-ca" / "ca.key").is_file()
    assert not (tmp_path / "kits" / "coordinator" / "ca.key").exists()
