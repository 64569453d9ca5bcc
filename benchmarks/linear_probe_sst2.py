"""Linear-probe ceiling on SST-2: what a classifier on the frozen encoder reaches, without privacy.

Why: the utility benchmark's DP arms (benchmarks/utility_sst2.py) train LoRA matrices and the head under
DP-SGD noise. Whether they learn anything beyond the pretrained features shows against this number: a
multinomial logistic regression on the frozen encoder's sentence features (the same pooling the product's
head reads, ``model.pooling``), fit to convergence on the same training sentences the central arm trains on
and scored on the same 872 dev sentences. A DP arm at or below it learned no features; the non-private
fine-tuned arms show what feature learning adds.

The data comes from fedpriv's own loader with the utility benchmark's data settings (``examples`` sentences
of ``train.tsv`` drawn with ``seed``, one organisation: its central arm); the features from the packaged
model's encoder in eval mode (the input of its classification head, captured by a hook); the fit is L-BFGS
with an L2 penalty ``l2`` on the weights.

    python benchmarks/linear_probe_sst2.py out=/tmp/sst2-probe
    python benchmarks/linear_probe_sst2.py model=tiny examples=200 out=/tmp/x     # smoke run (the test)

Writes ``<out>/result.json`` (also printed as the last line).
"""

from __future__ import annotations

import json
import os
import sys
import time

from benchmark_settings import parse_settings
from utility_sst2 import DEFAULTS as UTILITY_DEFAULTS
from utility_sst2 import arm_overrides, common_overrides, prepare

DEFAULTS = {
    "model": "minilm",
    "examples": 8000,  # as utility_sst2: training sentences drawn from train.tsv with the seed; 0 = all
    "max_length": 64,
    "pooling": "auto",
    "seed": 42,
    "l2": 0.01,  # L2 penalty on the weights (sum of squares), added to the mean cross-entropy
    "max_iter": 500,  # L-BFGS iterations
    "feature_batch": 256,  # sentences per forward pass while computing features
    "train": UTILITY_DEFAULTS["train"],
    "dev": UTILITY_DEFAULTS["dev"],
    "out": "",
}


def probe_config(args: dict):
    """fedpriv's config of the utility benchmark's central arm, for the plain (not LoRA-wrapped) model."""
    from fedpriv.kernel.config import load_config

    settings = {**UTILITY_DEFAULTS, **{k: args[k] for k in DEFAULTS if k in UTILITY_DEFAULTS}}
    overrides = [*common_overrides(settings), *arm_overrides(settings, "central"), "model.finetuning=full"]
    return load_config(None, overrides)


def features(model, tokenizer, texts: list[str], max_length: int, batch: int):
    """The classification head's input for every text (eval mode: no dropout), in the order given."""
    import torch

    captured = []
    hook = model.classifier.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths per batch: less padding
    rows = [None] * len(texts)
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch):
                chunk = order[start : start + batch]
                encoded = tokenizer(
                    [texts[i] for i in chunk], truncation=True, max_length=max_length, padding=True,
                    return_tensors="pt",
                )  # fmt: skip
                captured.clear()
                model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
                for i, row in zip(chunk, captured[0], strict=True):
                    rows[i] = row
    finally:
        hook.remove()
    return torch.stack(rows)


def fit_probe(x, y, classes: int, l2: float, max_iter: int):
    """Multinomial logistic regression (weights and bias) fit by L-BFGS; returns (weight, bias)."""
    import torch

    weight = torch.zeros(classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, y) + l2 * (weight**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def main(argv: list[str]) -> dict:
    args = parse_settings(argv, DEFAULTS, numbers=("l2",))
    out = prepare(args, "fedpriv-sst2-probe-")
    started = time.monotonic()
    import torch

    from fedpriv.data.partitioning import plan_partitions
    from fedpriv.shared_models.builder import build_model, build_tokenizer
    from fedpriv.shared_models.sources import resolve_pooling

    cfg = probe_config(args)
    plan = plan_partitions(cfg)
    org = plan.org(0)
    model = build_model(cfg.model, list(plan.label_names)).eval()
    tokenizer = build_tokenizer(cfg.model.name)
    x_train = features(model, tokenizer, org.train.texts, cfg.data.max_length, args["feature_batch"])
    x_test = features(model, tokenizer, org.test.texts, cfg.data.max_length, args["feature_batch"])
    y_train, y_test = torch.tensor(org.train.labels), torch.tensor(org.test.labels)
    weight, bias = fit_probe(x_train, y_train, len(plan.label_names), args["l2"], args["max_iter"])
    predicted = (x_test @ weight.T + bias).argmax(dim=1)
    train_accuracy = ((x_train @ weight.T + bias).argmax(dim=1) == y_train).float().mean().item()
    result = {
        "benchmark": "linear_probe_sst2",
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "settings": {k: v for k, v in args.items() if k != "out"},
        "pooling": resolve_pooling(cfg.model.name, cfg.model.pooling),  # what the head reads: mean or cls
        "feature_dim": int(x_train.shape[1]),
        "train_examples": len(org.train.texts),
        "test_examples": len(org.test.texts),
        "majority_accuracy": round(torch.bincount(y_test).max().item() / len(y_test), 4),
        "train_accuracy": round(train_accuracy, 4),
        "accuracy": round((predicted == y_test).float().mean().item(), 4),
        "wall_s": round(time.monotonic() - started, 1),
        "out": str(out),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
