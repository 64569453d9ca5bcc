"""Smoke run of benchmarks/linear_probe_sst2.py (tiny model), so the benchmark cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "linear_probe_sst2.py"
SST2 = REPO.parent / "shared" / "data" / "sst2"


@pytest.mark.skipif(not (SST2 / "dev.tsv").is_file(), reason="needs ../shared/data/sst2 (see ../shared/data/README.md)")
def test_the_probe_fits_the_central_arms_sentences_and_scores_the_whole_dev_set(tmp_path):
    out = tmp_path / "probe"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "model=tiny", "examples=200", "max_iter=50", f"out={out}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == json.loads((out / "result.json").read_text())
    # the utility benchmark's central arm: its 200 training sentences, all 872 dev sentences
    assert (result["train_examples"], result["test_examples"]) == (200, 872)
    assert result["majority_accuracy"] == round(444 / 872, 4)
    assert result["pooling"] == "cls" and result["feature_dim"] == 64  # the tiny BERT's hidden size
    assert 0 <= result["accuracy"] <= 1 and 0.5 <= result["train_accuracy"] <= 1


def test_the_probe_refuses_unknown_settings_and_a_used_folder(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "lr=3"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "unknown setting 'lr'" in done.stderr
    (tmp_path / "old.txt").write_text("an earlier run")
    done = subprocess.run([sys.executable, str(SCRIPT), f"out={tmp_path}"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "not empty" in done.stderr
