"""Smoke run of benchmarks/dp_throughput.py on the tiny model, so the benchmark cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "dp_throughput.py"


def test_the_throughput_benchmark_times_and_sizes_each_mode(tmp_path):
    out = tmp_path / "throughput.json"
    command = [sys.executable, str(SCRIPT), "model=tiny", "finetuning=lora", "modes=nondp,bk", "steps=1", "repeats=1"]
    subprocess.run([*command, f"out={out}"], capture_output=True, text=True, check=True)
    result = json.loads(out.read_text())
    lora = result["lora"]
    assert 0 < lora["trainable_parameters"] < 10_000
    assert lora["modes"]["nondp"]["samples_per_s"] > 0 and lora["modes"]["bk"]["throughput_vs_nondp"] > 0
    memory = lora["modes"]["bk"]["memory"]
    assert memory["peak_rss_mb"] >= memory["training_rss_mb"] >= 0 and lora["modes"]["bk"]["peak_rss_vs_nondp"] > 0


def test_an_unknown_mode_is_refused_in_one_line():
    done = subprocess.run([sys.executable, str(SCRIPT), "modes=nondp,fast"], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip() == "modes: unknown fast; known: nondp, hooks, ghost, bk"


def test_length_bucketing_is_timed_against_one_pass_on_sentences_of_varied_length(tmp_path):
    sst2 = SCRIPT.parents[2] / "shared" / "data" / "sst2" / "train.tsv"
    if not sst2.is_file():
        pytest.skip("../shared/data/sst2 is absent (CI and dev machines)")
    out = tmp_path / "buckets.json"
    command = [sys.executable, str(SCRIPT), "model=tiny", "finetuning=lora", "modes=bk", "steps=1", "repeats=1"]
    command += ["memory=0", "batch=16", "text=sst2", "max_batch_tokens=0,128", f"out={out}"]
    subprocess.run(command, capture_output=True, text=True, check=True)
    modes = json.loads(out.read_text())["lora"]["modes"]
    one_pass, bucketed = modes["bk"], modes["bk/max_batch_tokens=128"]
    assert 0 < bucketed["padded_tokens_per_step"] < one_pass["padded_tokens_per_step"]  # sorted: less padding
    assert bucketed["samples_per_s"] > 0 and bucketed["throughput_vs_one_pass"] > 0


def test_a_token_budget_below_the_sequence_length_is_refused_in_one_line():
    done = subprocess.run([sys.executable, str(SCRIPT), "max_batch_tokens=0,64"], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip() == "max_batch_tokens: 0 (one pass) or integers >= seq (128), comma-separated"
