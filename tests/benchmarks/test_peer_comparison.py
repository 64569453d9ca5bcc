"""Smoke run of benchmarks/peer_comparison.py (tiny model, 2 organisations, 2 rounds), so it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "peer_comparison.py"
SST2 = REPO.parent / "shared" / "data" / "sst2"


@pytest.mark.integration
@pytest.mark.skipif(not (SST2 / "dev.tsv").is_file(), reason="needs ../shared/data/sst2 (see ../shared/data/README.md)")
def test_the_peer_under_reports_its_epsilon_and_uploads_the_full_model(tmp_path):
    from fedpriv.privacy.calibration import compute_epsilon

    out = tmp_path / "bench"
    settings = ["model=tiny", "examples=240", "orgs=2", "alpha=100", "rounds=2", "batch=16", f"out={out}"]
    done = subprocess.run([sys.executable, str(SCRIPT), *settings], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == json.loads((out / "result.json").read_text()) and result["ok"]
    peer, ours = result["arms"]
    assert (peer["arm"], ours["arm"]) == ("peer", "fedpriv")
    # the same organisations and partitions, and the whole dev set, in both arms
    assert {org: sizes["train"] for org, sizes in result["orgs"].items()} == ours["org_train_examples"]
    assert peer["test_examples"] == ours["test_examples"] == 872
    assert len(peer["accuracy_per_round"]) == len(ours["accuracy_per_round"]) == 2
    for org, p in peer["orgs"].items():
        # what each round's fresh engine reports is the target; what the rounds spent together is more
        assert len(p["reported_epsilon_per_round"]) == 2
        assert all(abs(eps - 8.0) < 0.1 for eps in p["reported_epsilon_per_round"]), org
        assert p["steps_recorded"] == 2 * p["steps_per_round"]
        spent = compute_epsilon(noise_multiplier=p["noise_multiplier"], sample_rate=p["sample_rate"],
                                steps=p["steps_recorded"], delta=1e-5, accountant="rdp")  # fmt: skip
        assert p["actual_epsilon_rdp"] == pytest.approx(spent, rel=1e-6)
        assert p["actual_epsilon_rdp"] > 9.5 and p["actual_epsilon_prv"] > 9.5
        assert p["noise_multiplier_needed_all_rounds"] > p["noise_multiplier"] > 0
    assert peer["actual_epsilon_rdp_max"] > peer["reported_epsilon_max"]
    # fedpriv's accountant is never reset: the whole run stays within the target
    assert 7.9 <= ours["epsilon_spent_max"] <= 8.0
    # the peer ships every tensor of the model, fedpriv the LoRA adapters and the head
    assert peer["exchanged_params"] > 100 * ours["exchanged_params"] > 0
    assert peer["upload_bytes_per_node_round"] > 4 * peer["exchanged_params"] > ours["upload_bytes_per_node_round"]
    assert abs(peer["upload_bytes_total"] - 2 * 2 * peer["upload_bytes_per_node_round"]) <= 4  # a rounded mean
    assert ours["upload_bytes_total"] == ours["upload_bytes_per_node_round"] * 2 * 2  # rounds x organisations
    table = (out / "result.md").read_text()
    assert table.count("\n| peer |") == 1 and "\n| fedpriv |" in table and "needed noise multipliers" in table


def test_the_peer_comparison_refuses_unknown_settings():
    done = subprocess.run([sys.executable, str(SCRIPT), "arms=peer,theirs"], capture_output=True, text=True)
    assert done.returncode == 1 and "arms: unknown 'theirs'" in done.stderr
