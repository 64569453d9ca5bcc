"""The FEDERATION.yaml shipped in examples/ stays valid and provisions complete kits from join requests."""

from __future__ import annotations

import shutil
from pathlib import Path

from fedpriv.commands.app_source import fab_sha256, stage_app
from fedpriv.commands.provisioning.federation import load_federation
from fedpriv.commands.provisioning.join import init_org
from fedpriv.commands.provisioning.kits import provision
from fedpriv.kernel.node_config import load_node_config

EXAMPLE = Path(__file__).resolve().parents[4] / "examples" / "FEDERATION.yaml"


def test_shipped_example_provisions_every_party_from_join_requests(tmp_path):
    """What the example's comments say to do: each organisation's join request, the staged app, then provision."""
    shutil.copy(EXAMPLE, tmp_path / "FEDERATION.yaml")
    (tmp_path / "requests").mkdir()
    for org in ("hospital-a", "hospital-b"):
        outcome = init_org(org, tmp_path / "sites" / org, "clinics-2026")
        shutil.copy(outcome.request_path, tmp_path / "requests" / f"{org}.json")
    app = stage_app(tmp_path / "fedpriv-app")
    federation = load_federation(tmp_path / "FEDERATION.yaml")
    provision(federation, tmp_path / "kits")
    orgs = [org.name for org in federation.organisations]
    assert orgs == ["hospital-a", "hospital-b"]
    for org in orgs:
        node = load_node_config(tmp_path / "kits" / org / "node.yaml")
        assert node.org == org and node.approved_apps == [fab_sha256(app)]
        assert not (tmp_path / "kits" / org / "node.key").exists()
    assert load_node_config(tmp_path / "kits" / "hospital-b" / "node.yaml").privacy.target_epsilon == 3.0
    assert (tmp_path / "kits" / "coordinator-ca" / "ca.key").is_file()
    assert not (tmp_path / "kits" / "coordinator" / "ca.key").exists()
    assert (tmp_path / "kits" / "coordinator" / "fleet-gateway.conf").is_file()
