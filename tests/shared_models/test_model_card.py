"""The exported model card: its loading code runs as written, and it names the results and the privacy spent."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from fedpriv.kernel.config import ModelConfig
from fedpriv.shared_models.builder import build_model, build_tokenizer
from fedpriv.shared_models.export import export_model


def run_card_code(model_dir: Path) -> str:
    """The card's one Python block, extracted and run as written from the model folder by a plain Python that
    cannot import fedpriv; its stdout."""
    card = (model_dir / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert len(blocks) == 1, card
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", blocks[0]],
        cwd=model_dir,
        env={**env, "HF_HUB_OFFLINE": "1"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "custom code" not in proc.stdout + proc.stderr  # transformers never stops to ask
    return proc.stdout


def test_a_runs_card_loads_as_written_and_names_accuracy_epsilon_and_redaction(tiny_dp_run):
    _, out = tiny_dp_run
    summary = json.loads((out / "summary.json").read_text())
    card = (out / "model" / "README.md").read_text()
    final = summary["final"]
    assert f"Accuracy {final['accuracy']:.3f}, macro-F1 {final['macro_f1']:.3f}" in card
    for org, report in summary["privacy"].items():
        assert f"- {org}: epsilon {report['epsilon']:.3f} at delta 1e-05 (target 8)" in card
    assert "No organisation redacted its text" in card and "with DP-SGD" in card
    assert "max_length=64" in card  # the run's data.max_length
    assert "`fedpriv audit` recompute these" in card
    printed = run_card_code(out / "model")
    assert printed.strip().startswith("['") and printed.strip().strip("[]'") in summary["label_names"]


def test_a_mean_pooled_card_asks_for_remote_code_and_says_when_dp_was_off(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="tiny", finetuning="lora", pooling="mean"), ["neg", "pos"])
    summary = {
        "dp_enabled": False, "status": "completed", "config": {"training": {"rounds": 3}},
        "rounds": [{}, {}, {}], "final": {"round": 3, "accuracy": 0.75, "macro_f1": None}, "privacy": {},
    }  # fmt: skip
    export_model(model, build_tokenizer("tiny"), tmp_path / "model", max_length=40, summary=summary)
    card = (tmp_path / "model" / "README.md").read_text()
    assert card.count('from_pretrained("merged", trust_remote_code=True)') == 2 and "max_length=40" in card
    assert "Accuracy 0.750, macro-F1 not shared by the organisations" in card and "after round 3 of 3" in card
    assert "DP was OFF in this run: the model carries no differential privacy guarantee." in card
    assert "WITHOUT differential privacy" in card and "with DP-SGD" not in card and "ledgers" not in card
    assert run_card_code(tmp_path / "model").strip() in ("['neg']", "['pos']")
