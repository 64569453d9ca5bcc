"""Smoke run of benchmarks/dp_local_settings.py (tiny model), so the benchmark cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.benchmarks.scripts import benchmark_module

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "dp_local_settings.py"
TINY = ["model=tiny", "examples=40", "rounds=2", "batch=8", "max_length=32"]


def run(*settings: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *settings], capture_output=True, text=True, timeout=300)


def test_dp_rounds_spend_the_planned_budget_and_a_control_run_spends_none():
    done = run(*TINY)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["train_examples"], result["test_examples"]) == (32, 8)  # one IID organisation, 80/20
    assert result["settings"]["model"] == "tiny" and result["noise_multiplier"] > 0
    # expected batch 8 of 32 (q = 1/4): 4 steps per epoch, one epoch in each of the 2 rounds, on one accountant
    assert result["steps"] == 8
    assert 7.5 < result["epsilon"] <= 8.0
    assert 0 <= result["accuracy"] <= 1 and 0 <= result["macro_f1"] <= 1
    threads = torch.get_num_threads()
    try:  # same clipping, no noise: no privacy, no epsilon
        result = benchmark_module("dp_local_settings").main([*TINY, "sigma=0", f"threads={threads}"])
    finally:
        torch.set_num_threads(threads)  # the rest of the suite runs in this process
    assert result["noise_multiplier"] == 0 and result["epsilon"] is None and result["steps"] == 8


def test_an_unknown_model_is_one_line():
    with pytest.raises(SystemExit, match=r"^dp_local_settings: model=bert-large: expected one of minilm, tiny$"):
        benchmark_module("dp_local_settings").main(["model=bert-large"])
