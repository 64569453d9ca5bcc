"""The simulation side of the empirical audit: canaries in one organisation's training, then score them.

``canary_audit.enabled`` makes the simulated organisation ``canary_audit.org``
(and no other) train with the canaries drawn "in": ``kind: gradient`` adds
Dirac canaries to its clipped gradient sums before the noise
(``privacy/gradient_canaries.py``); ``kind: text`` adds canary sentences to its
partition (``privacy/canaries.py``). After the run, the final global model
scores all canaries (gradient: each coordinate's movement from the initial
model against the canary's direction; text: the canary's loss), and the
one-run bound is written to ``empirical_audit.json`` next to the
organisation's claimed epsilon and the largest bound the settings can reach
(``max_reachable_epsilon``). The canaries are a deterministic function of the
config, drawn in ``privacy/audit_canaries.py`` by the node and by this scoring
side alike, so the scorer rebuilds exactly the set the node used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fedpriv.kernel import atomic_files
from fedpriv.kernel.config import FedPrivConfig
from fedpriv.privacy.audit_canaries import canaries_for, fitted, gradient_canaries_for
from fedpriv.privacy.canaries import Canaries, guess_and_bound, max_reachable_epsilon, reach_note
from fedpriv.privacy.gradient_canaries import dirac_scores, flat_trainable
from fedpriv.privacy.org_plan import org_target

EMPIRICAL_FILE = "empirical_audit.json"


def plan_line(cfg: FedPrivConfig, org: str, delta: float, num_coordinates: int | None = None) -> str:
    """What the audit will do and the most it can show, printed before the run."""
    audit = cfg.canary_audit if num_coordinates is None else fitted(cfg, num_coordinates)
    guesses = audit.guesses_each_way
    reach = max_reachable_epsilon(audit.count, guesses, delta, audit.confidence)
    what = (
        "gradient (Dirac) canaries added to its clipped gradient sums"
        if audit.kind == "gradient"
        else ("text canaries added to its data")
    )
    line = (
        f"Canary audit: {audit.count} {what}, each with probability 1/2, in {org} only; {guesses} guesses each way"
        f" can show at most epsilon >= {reach:.2f} ({audit.confidence:.0%} confidence, delta {delta:g})"
    )
    claimed = org_target(cfg, org)[0] if cfg.privacy.enabled else None
    note = reach_note(reach, claimed) if claimed is not None and reach < claimed else ""
    return line + (f": {note}" if note else "")


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


def audited_org(cfg: FedPrivConfig) -> str:
    """The name of the organisation at partition index ``canary_audit.org``."""
    from fedpriv.data.partitioning import plan_partitions

    return plan_partitions(cfg).orgs[cfg.canary_audit.org].name


def run_canary_audit(cfg: FedPrivConfig, run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Score the canaries with the run's final model; write and return the empirical audit."""
    from fedpriv.server.checkpoints import checkpoint_path, load_checkpoint
    from fedpriv.shared_models.builder import build_model, build_tokenizer
    from fedpriv.shared_models.weights import load_trainable

    audit = cfg.canary_audit
    label_names = summary["label_names"]
    model = build_model(cfg.model, label_names)
    initial = flat_trainable(model) if audit.kind == "gradient" else None
    last_round = summary["rounds"][-1]["round"] if summary["rounds"] else 0
    if last_round:
        load_trainable(model, load_checkpoint(checkpoint_path(run_dir, last_round)))
    if audit.kind == "gradient":
        final = flat_trainable(model)
        audit = fitted(cfg, final.numel())
        gradient = gradient_canaries_for(cfg, final.numel())
        scores, included = dirac_scores(initial, final, gradient), gradient.included
        method = (
            "one-run audit (Steinke, Nasr and Jagielski 2023), white-box: Dirac gradient canaries of norm"
            f" {gradient.norm:g} added to the clipped gradient sum before the noise, scored by their coordinate's"
            " movement in the final global model, top/bottom guesses"
        )
    else:
        tokenizer = build_tokenizer(cfg.model.name)
        canaries = canaries_for(cfg, len(label_names), tokenizer)
        scores, included = canary_scores(model, canaries, tokenizer, cfg.data.max_length), canaries.included
        method = "one-run audit (Steinke, Nasr and Jagielski 2023), text canaries, loss scores, top/bottom guesses"
    org = audited_org(cfg)
    report = summary.get("privacy", {}).get(org, {})
    claimed = report.get("epsilon") if summary.get("dp_enabled") else None
    delta = org_target(cfg, org, report)[1]
    result = {
        "org": org,
        "method": method,
        "kind": audit.kind,
        "claimed_epsilon": claimed,
        "round": last_round,
        **guess_and_bound(scores, included, audit.guesses_each_way, delta, audit.confidence),
    }
    result["consistent"] = claimed is None or result["epsilon_lower_bound"] <= claimed
    # whether this audit could show a bound above the claim at all (None without a claim)
    result["can_contradict_claim"] = None if claimed is None else result["max_reachable_epsilon"] > claimed
    atomic_files.write_text(run_dir / EMPIRICAL_FILE, json.dumps(result, indent=2) + "\n")
    return result


def describe(result: dict[str, Any]) -> str:
    claimed = result["claimed_epsilon"]
    versus = "no DP claim (DP off)" if claimed is None else f"claimed epsilon {claimed:.3f}"
    verdict = "" if result["consistent"] else "  ** ABOVE THE CLAIM: the DP guarantee is contradicted **"
    text = (
        f"Empirical audit ({result['org']}): {result['correct']}/{result['guesses']} membership guesses right on"
        f" {result['canaries']} canaries -> epsilon >= {result['epsilon_lower_bound']:.3f}"
        f" ({result['confidence']:.0%} confidence), {versus}{verdict}"
    )
    reach = result.get("max_reachable_epsilon")
    if reach is None:  # written before the field existed
        return text
    note = reach_note(reach, claimed)
    return (
        text
        + f"\n  The most these settings can show (every guess right): epsilon >= {reach:.3f}"
        + (f"; {note}" if note else ", above the claim: the audit could contradict it")
    )
