"""The canaries of a run's canary audit, drawn from its config alone.

The audited organisation's node puts them into its training (text canaries into its data, Dirac canaries into its
clipped gradient sums) and the scorer rebuilds the same set after the run (simulations/canary_audit.py): both
draw them here, from the config and the model's size, so they cannot differ.
"""

from __future__ import annotations

import dataclasses
import functools

from fedpriv.kernel.config import CanaryAuditConfig, ConfigError, FedPrivConfig
from fedpriv.privacy.canaries import Canaries, make_canaries, word_vocabulary
from fedpriv.privacy.gradient_canaries import DiracCanaries, make_dirac_canaries


def canaries_for(cfg: FedPrivConfig, num_labels: int, tokenizer) -> Canaries:
    audit = cfg.canary_audit
    return make_canaries(audit.count, num_labels, audit.seed, word_vocabulary(tokenizer))


def fitted(cfg: FedPrivConfig, num_coordinates: int) -> CanaryAuditConfig:
    """The audit with its number of canaries fixed for this model.

    Gradient canaries need a trainable coordinate each: left at its default (``canaries: null``), their number
    is the default or the model's trainable coordinates, whichever is fewer (the tiny model with LoRA has 4,421),
    and the plan says how far that audit can reach; a number set explicitly is kept (``check_fits``).
    """
    audit = cfg.canary_audit
    if audit.kind == "gradient" and audit.canaries is None and audit.count > num_coordinates:
        return dataclasses.replace(audit, canaries=num_coordinates)
    return audit


def gradient_canaries_for(cfg: FedPrivConfig, num_coordinates: int) -> DiracCanaries:
    """The Dirac canaries over ``num_coordinates`` trainable coordinates (the node and the scorer draw the same)."""
    audit = fitted(cfg, num_coordinates)
    return _dirac(audit.count, num_coordinates, audit.seed, cfg.privacy.max_grad_norm)


@functools.lru_cache(maxsize=4)
def _dirac(count: int, num_coordinates: int, seed: int, norm: float) -> DiracCanaries:
    return make_dirac_canaries(count, num_coordinates, seed, norm)


def check_fits(cfg: FedPrivConfig, num_coordinates: int) -> None:
    """ConfigError before any training when the gradient canaries asked for outnumber the trainable coordinates."""
    audit = fitted(cfg, num_coordinates)
    if audit.enabled and audit.kind == "gradient" and audit.count > num_coordinates:
        raise ConfigError(
            f"config: canary_audit.canaries: {audit.count} gradient canaries need as many trainable coordinates;"
            f" model {cfg.model.name} ({cfg.model.finetuning}) has {num_coordinates}: set canary_audit.canaries"
            f" (the reachable bound falls with it) or fine-tune more of the model"
        )


def with_canaries(
    cfg: FedPrivConfig, partition_id: int, texts: list[str], labels: list[int], num_labels: int, tokenizer
) -> tuple[list[str], list[int]]:
    """The organisation's training texts/labels, plus the "in" canaries when it is the audited one."""
    if not cfg.canary_audit.enabled or partition_id != cfg.canary_audit.org:
        return list(texts), list(labels)
    extra_texts, extra_labels = canaries_for(cfg, num_labels, tokenizer).inserted()
    return list(texts) + extra_texts, list(labels) + extra_labels
