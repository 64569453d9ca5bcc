"""Helpers shared by the provisioning tests: a small federation file and the kits it makes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedpriv.commands.provisioning.federation import load_federation
from fedpriv.commands.provisioning.kits import provision


def federation_dict(**coordinator) -> dict:
    return {
        "federation": "clinics-2026",
        "coordinator": {"addresses": ["coordinator.example.org", "10.0.0.5"], "port": 9092, **coordinator},
        "validity_days": {"ca": 1825, "server": 397},
        "organisations": [
            {
                "name": "hospital-a",
                "contact": "dpo@hospital-a.example",
                "device": "auto",
                "privacy": {"target_epsilon": 8, "delta": 1.0e-5},
                "data": {"path": "/data/hospital-a/notes.csv", "text_column": "text", "label_column": "label"},
            },
            {"name": "hospital-b", "privacy": {"target_epsilon": 3}, "data": {"path": "notes.csv"}},
        ],
    }


def write_federation(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def federation_file(tmp_path: Path) -> Path:
    return write_federation(tmp_path / "FEDERATION.yaml", federation_dict())


@pytest.fixture
def kits(tmp_path: Path, federation_file: Path) -> Path:
    out = tmp_path / "kits"
    provision(load_federation(federation_file), out, make_org_keys=True)
    return out
