"""Smoke run of benchmarks/utility_sst2.py (tiny model, two arms, one round), so the benchmark cannot rot."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmarks.scripts import benchmark_module

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "utility_sst2.py"
SST2 = REPO.parent / "shared" / "data" / "sst2"


@pytest.mark.integration
@pytest.mark.skipif(not (SST2 / "dev.tsv").is_file(), reason="needs ../shared/data/sst2 (see ../shared/data/README.md)")
def test_the_utility_benchmark_compares_central_and_dp_arms_on_the_whole_dev_set(tmp_path):
    out = tmp_path / "bench"
    settings = [
        "model=tiny", "examples=200", "orgs=2", "alpha=100", "min_partition_size=30", "rounds=1", "batch=16",
        "max_length=32", "arms=central,dp-eps8", f"out={out}",
    ]  # fmt: skip
    done = subprocess.run([sys.executable, str(SCRIPT), *settings], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == json.loads((out / "result.json").read_text()) and result["ok"]
    central, dp = result["arms"]
    assert (central["arm"], dp["arm"]) == ("central", "dp-eps8")
    # the same training sentences and the same 872 test sentences in both arms
    assert result["dev_examples"] == 872 and result["majority_accuracy"] == round(444 / 872, 4)
    for arm in (central, dp):
        assert arm["status"] == "completed" and arm["train_examples"] == 200 and arm["test_examples"] == 872
        assert 0 <= arm["accuracy"] <= 1 and len(arm["accuracy_per_round"]) == 1 and arm["wall_s"] > 0
    assert central["orgs"] == 1 and not central["dp"] and "epsilon_spent_max" not in central
    assert dp["orgs"] == 2 and dp["dp"] and len(dp["epsilon_spent"]) == 2 and dp["target_epsilon"] == 8
    # the epsilon spent comes from summary.json: calibrated to just under the target
    assert 7.9 <= dp["epsilon_spent_min"] <= dp["epsilon_spent_max"] <= 8.0 and dp["delta"] == 1e-5
    assert all(sigma > 0 for sigma in dp["noise_multiplier"].values())
    gap = round(100 * (central["accuracy"] - dp["accuracy"]), 2)
    assert result["goal"]["gap_points"] == gap and result["goal"]["met"] == (gap <= 3.0)
    table = (out / "result.md").read_text()
    assert "| central | 1 | off |" in table and "| dp-eps8 | 2 | DP-SGD | 8 |" in table
    assert (out / "accuracy_vs_epsilon.png").read_bytes()[:4] == b"\x89PNG"


def test_the_utility_benchmark_refuses_unknown_settings_arms_and_a_used_folder(tmp_path):
    for setting, message in (("folds=3", "unknown setting"), ("arms=dp,local", "arms: unknown 'local'"),
                             ("setting=tpu", "setting: unknown 'tpu'"), ("arms=dp-epsx", "arms: unknown 'dp-epsx'")):  # fmt: skip
        done = subprocess.run([sys.executable, str(SCRIPT), setting], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and message in done.stderr
    (tmp_path / "old.txt").write_text("an earlier run")
    done = subprocess.run([sys.executable, str(SCRIPT), f"out={tmp_path}"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "not empty" in done.stderr


def test_arms_run_in_the_order_given_and_dp_expands_to_its_epsilons():
    bench = benchmark_module("utility_sst2")
    arm_names, parse_args = bench.arm_names, bench.parse_args
    assert arm_names(parse_args(["arms=dp-eps8,central,federated,dp-eps1"])) == [
        "dp-eps8", "central", "federated", "dp-eps1"
    ]  # fmt: skip
    assert arm_names(parse_args(["arms=central,dp", "epsilons=3,8"])) == ["central", "dp-eps3", "dp-eps8"]
    assert arm_names(parse_args(["arms=dp,dp-eps8", "epsilons=8"])) == ["dp-eps8"]


@pytest.mark.skipif(
    not (SST2 / "train.tsv").is_file(), reason="needs ../shared/data/sst2 (see ../shared/data/README.md)"
)
def test_the_gpu_settings_dp_arm_passes_fedpriv_s_own_checks(tmp_path):
    """The GPU setting (all of SST-2, batch 512) plans: every organisation of the Dirichlet split holds a batch."""
    utility_sst2 = benchmark_module("utility_sst2")
    args = utility_sst2.parse_args(["setting=gpu", "model=tiny"])
    command = [
        sys.executable, "-m", "fedpriv.cli", "simulate", *utility_sst2.common_overrides(args),
        *utility_sst2.arm_overrides(args, "dp-eps8"), "--dry-run", "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    sizes = [int(m) for m in re.findall(r"org-\d+\s+train\s+(\d+)", done.stdout)]
    assert len(sizes) == 8 and min(sizes) >= args["batch"] == 512 and sum(sizes) == 67349
