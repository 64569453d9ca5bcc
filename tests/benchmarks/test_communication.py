"""Smoke run of benchmarks/communication.py on the tiny model, so the benchmark cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "communication.py"


def test_the_communication_benchmark_sizes_real_replies_of_lora_and_full_updates(tmp_path):
    out = tmp_path / "communication.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "models=tiny", "secagg=lora", f"out={out}"],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == result
    rows = {row["finetuning"]: row for row in result["rows"]}
    assert set(rows) == {"lora", "full"} and {row["model"] for row in rows.values()} == {"tiny"}
    lora, full = rows["lora"], rows["full"]
    assert lora["full_model_params"] == full["full_model_params"]  # one denominator: the base model
    for row in (lora, full):
        # fp32 tensors as Flower serializes them (.npy), inside a reply that also carries metrics and the ledger
        assert row["tensor_bytes"] == 4 * row["trainable_params"]
        assert row["array_bytes"] > row["tensor_bytes"]
        assert row["train_reply_bytes"] > row["array_bytes"] and row["evaluate_reply_bytes"] > 0
        assert row["round_upload_bytes"] == row["train_reply_bytes"] + row["evaluate_reply_bytes"]
        assert row["ratio_round_upload"] == round(row["round_upload_bytes"] / row["full_model_fp32_bytes"], 6)
    assert lora["trainable_params"] < full["trainable_params"] < full["full_model_params"]
    assert lora["ratio_round_upload"] < 0.05 < 0.9 < full["ratio_round_upload"] < 1.05
    # SecAgg+ (LoRA only here, to keep the smoke run short) uploads the quantised, masked vector plus the
    # weight factor as 32-bit words (Flower's int64, packed by fedpriv/runtime/masked_vectors.py): the fp32 bytes
    assert "secagg" not in full
    secagg = lora["secagg"]
    assert secagg["masked_vector_dtype"] == "uint32" and secagg["masked_values"] == lora["trainable_params"] + 1
    assert 4 * secagg["masked_values"] <= secagg["masked_vector_bytes"] < 4 * secagg["masked_values"] + 1024
    assert set(secagg["reply_bytes"]) == {"setup", "share_keys", "collect_masked_vectors", "unmask", "evaluate"}
    assert secagg["reply_bytes"]["collect_masked_vectors"] > secagg["masked_vector_bytes"]
    assert secagg["round_upload_bytes"] == sum(secagg["reply_bytes"].values())
    # 32-bit words plus the key-exchange stages: about what the plain path uploads (not twice, as with int64)
    assert 0.5 * lora["round_upload_bytes"] < secagg["round_upload_bytes"] < 1.5 * lora["round_upload_bytes"]


def test_the_communication_benchmark_refuses_unknown_settings():
    done = subprocess.run([sys.executable, str(SCRIPT), "models=bert"], capture_output=True, text=True)
    assert done.returncode == 1 and "models: unknown 'bert'" in done.stderr


def test_frozen_a_lora_uploads_the_b_matrices_and_the_head_only(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "models=tiny", "finetuning=lora,lora-frozen-a", "secagg=none"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = {row["finetuning"]: row for row in json.loads(done.stdout.strip().splitlines()[-1])["rows"]}
    lora, frozen_a = rows["lora"], rows["lora-frozen-a"]
    assert frozen_a["lora"]["freeze_a"] and not lora["lora"]["freeze_a"]
    # tiny: hidden 64, r 8, query/value in 2 layers: A and B are 512 each per module; the 3-class head 195
    assert lora["trainable_params"] - frozen_a["trainable_params"] == 2 * 2 * 8 * 64
    assert frozen_a["round_upload_bytes"] < lora["round_upload_bytes"]
