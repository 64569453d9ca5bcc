"""Build the shared sequence classifier (and its tokenizer) from config.

Every party (server and each organisation) builds the same model from the same
config, so the frozen weights that never travel must be identical everywhere:
pretrained weights come from local files, and anything randomly initialised is
drawn under a fixed seed (``model.init_seed``).
"""

from __future__ import annotations

import os
from functools import lru_cache

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402

from fedpriv.kernel.config import ModelConfig  # noqa: E402
from fedpriv.kernel.errors import ConfigError  # noqa: E402
from fedpriv.shared_models.sources import minilm_dir, model_source, resolve_pooling  # noqa: E402

# Embeddings that Opacus cannot give correct per-sample gradients for when
# transformers creates their index tensors with batch size 1 (see stack facts);
# they are frozen in full fine-tuning (LoRA freezes them anyway).
FROZEN_EMBEDDING_SUFFIXES = ("position_embeddings.weight", "token_type_embeddings.weight")

TINY_BERT = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 512,
}


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@lru_cache(maxsize=4)
def build_tokenizer(name: str):
    """Tokenizer for ``model.name`` (the tiny model borrows MiniLM's WordPiece vocabulary)."""
    _quiet_transformers()
    from transformers import AutoTokenizer

    source = model_source(name) or minilm_dir()
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.name: cannot load a tokenizer from {source} ({exc.__class__.__name__})") from None


def _label_maps(label_names: list[str]) -> dict:
    return {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: i for i, name in enumerate(label_names)},
    }


def _base_model(cfg: ModelConfig, label_names: list[str]):
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    from fedpriv.shared_models.mean_pooling import MeanPooledBertConfig, MeanPooledBertForSequenceClassification

    mean = resolve_pooling(cfg.name, cfg.pooling) == "mean"
    source = model_source(cfg.name)
    if source is None:
        tokenizer = build_tokenizer(cfg.name)
        config_class, model_class = (
            (MeanPooledBertConfig, MeanPooledBertForSequenceClassification)
            if mean
            else (BertConfig, BertForSequenceClassification)
        )
        return model_class(config_class(vocab_size=len(tokenizer), **TINY_BERT, **_label_maps(label_names)))
    try:
        # A checkpoint with another head (other task, other label count) gets a fresh head, drawn under
        # model.init_seed so that every party builds the same one.
        loader = MeanPooledBertForSequenceClassification if mean else AutoModelForSequenceClassification
        return loader.from_pretrained(str(source), ignore_mismatched_sizes=True, **_label_maps(label_names))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.name: cannot load a sequence classifier from {source}: {exc}") from None


def build_model(cfg: ModelConfig, label_names: list[str]) -> torch.nn.Module:
    """The shared classifier in training mode, LoRA-wrapped when ``finetuning: lora``.

    Only the parameters with ``requires_grad`` are trained and exchanged.
    """
    _quiet_transformers()
    if len(label_names) < 2:
        raise ConfigError(f"data: expected at least 2 classes, got {label_names}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        model = _base_model(cfg, label_names)
        if cfg.finetuning == "lora":
            model = _wrap_lora(model, cfg)
        else:
            for name, param in model.named_parameters():
                if name.endswith(FROZEN_EMBEDDING_SUFFIXES):
                    param.requires_grad_(False)
    model.train()  # transformers 5 returns eval mode from from_pretrained
    return model


def _wrap_lora(model, cfg: ModelConfig):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        task_type="SEQ_CLS",  # keeps the classification head trainable (modules_to_save)
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(
            f"model.lora.target_modules: {list(cfg.lora.target_modules)} not found in {cfg.name}"
            f" (linear layers: {', '.join(names)}) [{exc.__class__.__name__}]"
        ) from None
    if cfg.lora.freeze_a:
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    return model
