"""Smoke run of benchmarks/redaction_cost.py on a tiny setting, so the benchmark cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "redaction_cost.py"


def test_the_redaction_benchmark_times_redaction_next_to_a_local_round(tmp_path):
    out = tmp_path / "redaction.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "model=tiny", "examples=200", "batch=16", f"out={out}"],
        capture_output=True,
        text=True,
        cwd=SCRIPT.parent,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["texts"] > 0 and result["redaction_s"] > 0 and result["local_round_s"] > 0
    one_off = result["one_off_vs_one_round"]
    assert one_off > 0 and abs(result["per_round_vs_round"] * result["rounds"] - one_off) <= 1e-3 * max(one_off, 1)
    assert result["replaced"]["person"] > 0  # news articles name people: the rules ran on the real corpus
    assert result["rules"].startswith("fedpriv-pii v")
