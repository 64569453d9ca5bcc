"""Smoke run of benchmarks/simulation_scale.py on 30 organisations, so the benchmark cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "simulation_scale.py"
SST2 = REPO.parent / "shared" / "data" / "sst2" / "train.tsv"


@pytest.mark.integration
@pytest.mark.skipif(not SST2.is_file(), reason="needs ../shared/data/sst2/train.tsv (see ../shared/data/README.md)")
def test_the_scale_benchmark_runs_a_small_federation_and_checks_its_state(tmp_path):
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "orgs=30", "rounds=1", "sampled=4", f"out={out}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ok"] and result == json.loads((out / "result.json").read_text())
    (run,) = result["runs"]
    assert run["orgs"] == 30 and run["status"] == "completed" and run["summary_complete"]
    assert run["trained_per_round"] == [4] and run["orgs_trained"] == 4 and run["node_dirs_with_state"] == 4
    assert run["every_trained_org_has_accountant_and_ledger"] and run["coordinator_holds_every_ledger"]
    # the process tree (driver, Ray, two actors) was sampled, and the run folder measured
    assert run["peak_tree_rss_mb"] > run["peak_driver_rss_mb"] > 0 and run["peak_processes"] >= 3
    assert run["run_dir_bytes"] > run["nodes_bytes"] > 0 and run["state_bytes_per_trained_org"] > 0
    assert run["preflight_done_s"] < run["round_1_s"] <= run["wall_s"]


def test_the_scale_benchmark_refuses_unknown_settings_and_a_used_folder(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "organisations=5"], capture_output=True, text=True)
    assert done.returncode == 1 and "unknown setting" in done.stderr
    (tmp_path / "something.txt").write_text("not a benchmark run")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "orgs=30", f"out={tmp_path}"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1 and "not empty" in done.stderr
