"""Export the final global model as a loadable Hugging Face directory (+ LoRA adapter)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from shared_models.weights import unwrap


def export_model(model: torch.nn.Module, tokenizer, out_dir: str | Path) -> dict[str, str]:
    """Write ``merged/`` (plain transformers model + tokenizer) and, for LoRA, ``adapter/``.

    ``merged/`` loads with ``AutoModelForSequenceClassification.from_pretrained``
    and needs neither peft nor fedpriv.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(unwrap(model)).to("cpu").eval()
    paths: dict[str, str] = {}
    if hasattr(model, "merge_and_unload"):  # a peft model
        adapter_dir = out / "adapter"
        model.save_pretrained(str(adapter_dir))
        paths["adapter"] = str(adapter_dir)
        model = model.merge_and_unload()
    merged_dir = out / "merged"
    model.save_pretrained(str(merged_dir))
    tokenizer.save_pretrained(str(merged_dir))
    paths["merged"] = str(merged_dir)
    return paths
