"""How local DP-SGD settings trade signal against noise for one organisation.

Trains MiniLM + LoRA with the project's own training loop and Opacus
accounting on one BBC News partition for R rounds (fresh model copy per round,
as a node does), then evaluates on its test split. Prints one JSON line.

    python benchmarks/dp_local_settings.py batch=32 epochs=1 lr=0.005 max_length=128
    python benchmarks/dp_local_settings.py batch=64 epochs=2 lr=0.01 max_length=64
    python benchmarks/dp_local_settings.py batch=32 epochs=1 lr=0.005 max_length=128 sigma=0   # clipping only
    python benchmarks/dp_local_settings.py model=tiny examples=40 rounds=1 batch=8 max_length=32  # smoke test
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import tempfile
import time
import warnings

import torch
from benchmark_settings import parse_settings

from fedpriv.client.evaluation import evaluate
from fedpriv.client.tokenized import tokenize
from fedpriv.client.training import train_locally
from fedpriv.data.partitioning import plan_partitions
from fedpriv.kernel.config import LoraConfig, ModelConfig, TrainingConfig, load_config
from fedpriv.privacy.accountant_state import NodePrivacy
from fedpriv.privacy.calibration import plan_privacy
from fedpriv.shared_models.builder import build_model, build_tokenizer
from fedpriv.shared_models.weights import load_trainable, trainable_state

DEFAULTS = {
    "batch": 32, "epochs": 1, "lr": 0.005, "max_length": 128, "examples": 560, "rounds": 3,
    "rank": 8, "epsilon": 8.0, "sigma": None, "threads": 1, "model": "minilm",
}  # fmt: skip
MODELS = ("minilm", "tiny")  # the pretrained MiniLM-L6, or the 2-layer BERT built in code (smoke test)


def main(argv: list[str]) -> dict:
    warnings.filterwarnings("ignore")
    args = parse_settings(argv, DEFAULTS, numbers=("sigma",))
    if args["model"] not in MODELS:
        raise SystemExit(f"dp_local_settings: model={args['model']}: expected one of {', '.join(MODELS)}")
    torch.set_num_threads(args["threads"])
    cfg = load_config(
        overrides=[
            "partitioning.scheme=iid",
            "partitioning.num_orgs=1",
            "strategy.min_train_nodes=1",
            f"data.max_examples={args['examples']}",
            f"training.batch_size={args['batch']}",  # the partition plan checks a share holds one batch
        ]
    )
    org = plan_partitions(cfg).orgs[0]
    tokenizer = build_tokenizer(args["model"])
    train = tokenize(org.train.texts, org.train.labels, tokenizer, args["max_length"])
    test = tokenize(org.test.texts, org.test.labels, tokenizer, args["max_length"])
    lora = LoraConfig(r=args["rank"], alpha=2 * args["rank"])
    template = build_model(ModelConfig(name=args["model"], lora=lora), org.train.label_names)
    model = copy.deepcopy(template)
    training = TrainingConfig(batch_size=args["batch"], local_epochs=args["epochs"], learning_rate=args["lr"])
    plan = plan_privacy(
        org=org.name, num_examples=len(train), batch_size=args["batch"], local_epochs=args["epochs"],
        rounds=args["rounds"], target_epsilon=args["epsilon"], delta=1e-5, max_grad_norm=1.0, accountant="rdp",
    )  # fmt: skip
    if args["sigma"] is not None:  # a control run: same clipping, chosen noise (0 = no privacy)
        plan = dataclasses.replace(plan, noise_multiplier=args["sigma"])
    privacy = NodePrivacy.open(tempfile.mkdtemp(), plan)
    started = time.perf_counter()
    for _ in range(args["rounds"]):
        fresh = copy.deepcopy(template)
        load_trainable(fresh, trainable_state(model))
        model = fresh
        train_locally(
            model, train, cfg=training, pad_token_id=tokenizer.pad_token_id, device=torch.device("cpu"), privacy=privacy
        )
    counts = evaluate(model, test, num_labels=len(org.train.label_names), batch_size=64, pad_token_id=tokenizer.pad_token_id, device=torch.device("cpu"))  # fmt: skip
    result = {
        "settings": args,
        "train_examples": len(train),
        "test_examples": len(test),
        "noise_multiplier": plan.noise_multiplier,
        "steps": privacy.steps,
        "epsilon": privacy.epsilon() if plan.noise_multiplier > 0 else None,
        "accuracy": round(counts.accuracy, 4),
        "macro_f1": round(counts.macro_f1, 4),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
