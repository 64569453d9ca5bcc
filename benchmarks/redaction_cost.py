"""What redaction costs a node, next to its local DP round, on the demo corpus (issue 7: goal < 5%).

One organisation of the packaged demo (BBC News, 4 organisations, the demo's
model, batch, length and DP settings) is redacted with the default rule set
and then trains one local round with DP-SGD, as its node does, in the same
process. Redaction happens once per data set (a deployment node caches the
redacted tokens), so the cost per round over the run is the one-off cost
divided by the rounds. Prints one JSON line (and writes it to ``out`` if given).

    python benchmarks/redaction_cost.py                 # the demo setting (MiniLM, all 2,225 articles)
    python benchmarks/redaction_cost.py model=tiny examples=200 batch=16   # smoke
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from benchmark_settings import parse_settings

from fedpriv.client.node import fresh_model
from fedpriv.client.tokenized import redact_visible, tokenize
from fedpriv.client.training import train_locally
from fedpriv.data.partitioning import plan_partitions
from fedpriv.kernel.config import RedactionConfig, load_config
from fedpriv.privacy.accountant_state import NodePrivacy
from fedpriv.privacy.org_plan import org_privacy_plan, org_target
from fedpriv.privacy.redaction import Redactor
from fedpriv.shared_models.builder import build_tokenizer

DEFAULTS = {"model": "minilm", "examples": 0, "batch": 0, "org": 0, "threads": 2, "out": ""}  # 0: the demo's


def main(argv: list[str]) -> dict:
    warnings.filterwarnings("ignore")
    args = parse_settings(argv, DEFAULTS)
    torch.set_num_threads(args["threads"])
    overrides = [f"model.name={args['model']}"]
    if args["examples"]:
        overrides.append(f"data.max_examples={args['examples']}")
    if args["batch"]:
        overrides.append(f"training.batch_size={args['batch']}")
    cfg = load_config(overrides=overrides)  # the packaged demo, as `fedpriv simulate` runs it
    plan = plan_partitions(cfg)
    org = plan.org(args["org"])
    texts = [*org.train.texts, *org.test.texts]

    started = time.perf_counter()
    redactor = Redactor(RedactionConfig(enabled=True))
    _ = redactor.analyzer  # Presidio + spaCy + recognizers: paid once per process
    setup_s = time.perf_counter() - started
    tokenizer = build_tokenizer(cfg.model.name)
    started = time.perf_counter()
    redacted, counts = redact_visible(texts, tokenizer, cfg.data.max_length, redactor)  # what a node runs
    redact_s = time.perf_counter() - started
    whole = time.perf_counter()
    redactor.redact(texts)  # for comparison: every character of every text
    whole_s = time.perf_counter() - whole

    train_texts = redacted[: len(org.train.texts)]
    train = tokenize(train_texts, org.train.labels, tokenizer, cfg.data.max_length)
    model, _ = fresh_model(cfg.model, list(plan.label_names))
    privacy = NodePrivacy.open(
        tempfile.mkdtemp(), org_privacy_plan(cfg, org.name, len(train), org_target(cfg, org.name))
    )
    started = time.perf_counter()
    train_locally(
        model, train, cfg=cfg.training, pad_token_id=tokenizer.pad_token_id, device=torch.device("cpu"),
        privacy=privacy, grad_sample_mode=cfg.privacy.grad_sample_mode, seed=cfg.run.seed,
    )  # fmt: skip
    round_s = time.perf_counter() - started
    one_off = setup_s + redact_s
    result = {
        "settings": args,
        "org": org.name,
        "texts": len(texts),
        "mean_chars": round(sum(len(t) for t in texts) / len(texts), 1),
        "redaction_setup_s": round(setup_s, 2),
        "redaction_s": round(redact_s, 2),
        "ms_per_text": round(1000 * redact_s / len(texts), 2),
        "whole_texts_s": round(whole_s, 2),  # redacting every character, not only what the model sees
        "local_round_s": round(round_s, 2),
        "rounds": cfg.training.rounds,
        "redaction_vs_round": round(redact_s / round_s, 4),  # the redaction itself, next to one local round
        "one_off_vs_one_round": round(one_off / round_s, 4),  # with the process's set-up (imports)
        "per_round_vs_round": round(one_off / cfg.training.rounds / round_s, 4),
        "replaced": counts,
        "rules": redactor.spec["rules"] + " v" + redactor.spec["version"] + " (" + redactor.spec["engine"] + ")",
    }
    line = json.dumps(result)
    print(line, flush=True)
    if args["out"]:
        Path(args["out"]).write_text(line + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
