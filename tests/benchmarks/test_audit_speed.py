"""Smoke run of benchmarks/audit_speed.py on a tiny setting, so the benchmark cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "audit_speed.py"


def test_the_audit_benchmark_audits_an_intact_synthetic_run(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "orgs=3", "rounds=20", f"out={out}"], capture_output=True, text=True, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["entries"] == 60 and result["rdp_only_ok"] and result["with_pld_ok"]
    assert len(list((out / "ledgers").glob("*.jsonl"))) == 3


def test_the_audit_benchmark_will_not_write_into_another_folder(tmp_path):
    (tmp_path / "something.txt").write_text("not a benchmark run")
    done = subprocess.run([sys.executable, str(SCRIPT), "orgs=2", f"out={tmp_path}"], capture_output=True, text=True)
    assert done.returncode == 1 and "not empty" in done.stderr
