"""The simulation side of the empirical audit: put canaries into one organisation's data, then score them.

``canary_audit.enabled`` makes the simulated organisation ``canary_audit.org``
train on its partition plus the canaries drawn "in" (see
``privacy/canaries.py``). After the run, the final global model scores all
canaries, and the one-run bound is written to ``empirical_audit.json`` next to
the organisation's claimed epsilon. The canaries are a deterministic function
of the config, so the scoring side rebuilds exactly the set the node used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fedpriv.config import FedPrivConfig
from privacy.canaries import Canaries, guess_and_bound, make_canaries, word_vocabulary

EMPIRICAL_FILE = "empirical_audit.json"


def canaries_for(cfg: FedPrivConfig, num_labels: int, tokenizer) -> Canaries:
    audit = cfg.canary_audit
    return make_canaries(audit.canaries, num_labels, audit.seed, word_vocabulary(tokenizer))


def with_canaries(
    cfg: FedPrivConfig, partition_id: int, texts: list[str], labels: list[int], num_labels: int, tokenizer
) -> tuple[list[str], list[int]]:
    """The organisation's training texts/labels, plus the "in" canaries when it is the audited one."""
    if not cfg.canary_audit.enabled or partition_id != cfg.canary_audit.org:
        return list(texts), list(labels)
    extra_texts, extra_labels = canaries_for(cfg, num_labels, tokenizer).inserted()
    return list(texts) + extra_texts, list(labels) + extra_labels


@torch.no_grad()
def canary_scores(model: torch.nn.Module, canaries: Canaries, tokenizer, max_length: int) -> list[float]:
    """Negative cross-entropy of each canary under the final model (higher: fitted better)."""
    model.eval()
    scores = []
    for start in range(0, len(canaries.texts), 64):
        batch = tokenizer(
            canaries.texts[start : start + 64],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = torch.tensor(canaries.labels[start : start + 64])
        scores += (-torch.nn.functional.cross_entropy(logits, labels, reduction="none")).tolist()
    return scores


def run_canary_audit(cfg: FedPrivConfig, run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Score the canaries with the run's final model; write and return the empirical audit."""
    from server.checkpoints import checkpoint_path, load_checkpoint
    from shared_models.builder import build_model, build_tokenizer
    from shared_models.weights import load_trainable

    label_names = summary["label_names"]
    tokenizer = build_tokenizer(cfg.model.name)
    canaries = canaries_for(cfg, len(label_names), tokenizer)
    model = build_model(cfg.model, label_names)
    last_round = summary["rounds"][-1]["round"] if summary["rounds"] else 0
    if last_round:
        load_trainable(model, load_checkpoint(checkpoint_path(run_dir, last_round)))
    scores = canary_scores(model, canaries, tokenizer, cfg.data.max_length)
    org = f"org-{cfg.canary_audit.org}"
    report = summary.get("privacy", {}).get(org, {})
    claimed = report.get("epsilon") if summary.get("dp_enabled") else None
    delta = report.get("delta") or cfg.privacy.target_for(org)[1]
    result = {
        "org": org,
        "method": "one-run audit (Steinke, Nasr and Jagielski 2023), loss scores, top/bottom guesses",
        "claimed_epsilon": claimed,
        "round": last_round,
        **guess_and_bound(scores, canaries.included, cfg.canary_audit.guesses, delta, cfg.canary_audit.confidence),
    }
    result["consistent"] = claimed is None or result["epsilon_lower_bound"] <= claimed
    (run_dir / EMPIRICAL_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def describe(result: dict[str, Any]) -> str:
    claimed = result["claimed_epsilon"]
    versus = "no DP claim (DP off)" if claimed is None else f"claimed epsilon {claimed:.3f}"
    verdict = "" if result["consistent"] else "  ** ABOVE THE CLAIM: the DP guarantee is contradicted **"
    return (
        f"Empirical audit ({result['org']}): {result['correct']}/{result['guesses']} membership guesses right on"
        f" {result['canaries']} canaries -> epsilon >= {result['epsilon_lower_bound']:.3f}"
        f" ({result['confidence']:.0%} confidence), {versus}{verdict}"
    )
