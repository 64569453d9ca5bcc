"""The warm-up of ``fedpriv-superexec``: what every forked ClientApp would otherwise import and build again.

Only third-party modules are imported, and pure-data caches built; no torch operation, no CUDA
initialisation, no thread pool, so the children forked from this process start as clean as a fresh
interpreter would (fedpriv/runtime/fork_safety.py says when they would not).
"""

from __future__ import annotations

import importlib
import os
import sys

# What a fedpriv ClientApp imports that costs seconds: imported once here, shared by every forked message.
PRELOAD = (
    "numpy",
    "torch",
    "transformers",
    "peft",
    "opacus",
    "safetensors.torch",
    "flwr.supernode.runtime.run_clientapp",
    "flwr.client.mod",
    # what transformers/PEFT/the ledger load lazily on a message's first use (MiniLM is a BERT)
    "transformers.models.bert.modeling_bert",
    "transformers.models.bert.tokenization_bert",
    "peft.utils.transformers_weight_conversion",
    "nacl.signing",
)


def preload(modules: tuple[str, ...] = PRELOAD) -> list[str]:
    """Import ``modules`` (those that exist); returns the ones imported. Never runs torch code."""
    # torch.cuda.is_available() through NVML: a CUDA context in this process would be unusable in its children.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    loaded = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        loaded.append(name)
    return loaded


def warm_caches() -> list[str]:
    """Fill third-party caches every message would otherwise build again; returns those filled.

    PEFT asks transformers for its checkpoint conversion mapping whenever it wraps a model: built lazily
    (about 880 regular expressions, 0.25 s of CPU) and cached at module level, so a forked child inherits it.
    A node that redacts its data (node.yaml ``redaction``, on by default) builds Presidio's recognizers in
    its run's first message: Presidio's imports and ~250 compiled patterns (the largest part of a first
    ``warm_node``; BENCHMARKS.md, round overhead) are made here once instead. Pure data: no threads, no torch.
    """
    filled = []
    try:
        from transformers import conversion_mapping

        conversion_mapping.get_checkpoint_conversion_mapping("bert")
        filled.append("transformers.conversion_mapping")
    except (ImportError, AttributeError):
        pass
    from fedpriv.privacy.redaction import warm_engine

    try:
        if warm_engine():
            filled.append("presidio.recognizers")
    except Exception as exc:  # noqa: BLE001 - only a head start: a node that redacts meets the error itself
        print(f"fedpriv-superexec: redaction not warmed ({exc.__class__.__name__}: {exc})", file=sys.stderr)
    return filled
