"""fedpriv's apps on Flower's own processes: stock flower-superlink and flower-supernode from the kits, over TLS.

What an organisation gets when fedpriv's patches do not fit its Flower (fedpriv/runtime/patch_points.py) or it
chose Flower's commands (``FEDPRIV_SUPERLINK=flower-superlink``, ``FEDPRIV_SUPERNODE=flower-supernode``): the
same kits, certificates and node keys, the same run, only slower (3 s polls, a cold ClientApp per message).
"""

from __future__ import annotations

import pytest
import yaml

from fedpriv.commands.local_federation import federation_up, group_alive, tail
from fedpriv.commands.provisioning.kit_templates import SUPERLINK_ENV, SUPERNODE_ENV
from fedpriv.runtime.superexec import READY_LINE
from tests.deployment.helpers import processes_after, write_csv

pytestmark = pytest.mark.integration

ORGS = ("org-a", "org-b")
RUN_TIMEOUT_S = 240


def test_one_round_on_flowers_own_superlink_and_supernodes_over_tls(tmp_path, monkeypatch):
    orgs = []
    for seed, name in enumerate(ORGS):
        write_csv(tmp_path / f"{name}.csv", 80, seed)
        orgs.append(
            {"name": name, "device": "cpu", "privacy": {"target_epsilon": 8.0}, "data": {"path": f"{name}.csv"}}
        )
    raw = {"federation": "stock-fed", "coordinator": {"addresses": ["127.0.0.1"]}, "organisations": orgs}
    path = tmp_path / "FEDERATION.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    monkeypatch.setenv(SUPERLINK_ENV, "flower-superlink")  # what the kits' start scripts run instead of fedpriv's
    monkeypatch.setenv(SUPERNODE_ENV, "flower-supernode")
    lines: list[str] = []
    processes = {}
    result = federation_up(
        path,
        tmp_path / "kits",
        rounds=1,
        overrides=[
            "model.name=tiny",
            "training.batch_size=32",
            "training.local_epochs=1",
            "secure_aggregation.enabled=false",  # SecAgg+ needs 3 nodes; two keep the test short
        ],
        out=tmp_path / "run",
        run_timeout=RUN_TIMEOUT_S,
        say=lines.append,
        processes=processes,
    )
    output = "\n".join(lines)
    assert result.returncode == 0, output + "\n" + tail(result.run_dir / "logs" / "flwr-run.log")
    summary = result.summary
    assert summary["status"] == "completed" and summary["dp_enabled"] is True
    assert [r["round"] for r in summary["rounds"]] == [1]
    assert sorted(summary["rounds"][0]["trained_orgs"]) == list(ORGS)
    for org in ORGS:
        assert 0 < summary["privacy"][org]["epsilon"] <= 8.0
    # Flower's own processes: no fedpriv-superexec warmed up, nothing waited for one
    assert "SuperNodes warm" not in output and "TLS" in output
    for org in ORGS:
        assert READY_LINE not in (result.run_dir / "logs" / f"{org}.log").read_text(), org
    for name, proc in processes.items():
        assert proc.poll() is not None and not group_alive(proc.pid), name
    assert processes_after(tmp_path / "kits") == []
