"""Peer comparison: DP federated fine-tuning the way Flower's ``examples/opacus`` does it, against fedpriv.

The peer is a small Flower app written the way that example is written (nothing copied from it): a legacy
``NumPyClient`` behind ``ClientApp(client_fn=...)`` whose ``fit`` makes a NEW Opacus ``PrivacyEngine`` in
every round (``make_private`` with a fixed noise multiplier, Poisson sampling, per-example clipping with
Opacus's default hooks, SGD with momentum), trains the FULL model for one local epoch, prints
``privacy_engine.get_epsilon(delta)`` and returns every tensor of the model's ``state_dict``; the server is
Flower's FedAvg aggregation (``flwr.server.strategy.aggregate.aggregate``, what ``FedAvg.aggregate_fit``
computes) with the example's weighted-average accuracy. The server loop is a plain loop in this process
(the brief's option): each round it sends every organisation a real train message and an evaluate message
through the peer's ClientApp (Flower's legacy message conversion), so every reply is a real Flower
``Message``; its upload size is measured the way ``benchmarks/communication.py`` measures this project's
(the protobuf requests a SuperNode sends to the SuperLink).

Because each round's accountant is new, what a peer organisation reports is the epsilon of ONE round. Its
noise multiplier is chosen as a user of that example would: so that the per-round report equals the target
(``epsilon``). The benchmark also composes all rounds' steps (every engine's recorded history) with Opacus's
RDP accountant (and with the peer's own accountant) — the epsilon actually spent — and computes the noise
multiplier that would have met the target over all rounds.

fedpriv runs as users run it (``fedpriv simulate``, MiniLM + LoRA, its never-reset accountant, noise
calibrated once for all planned rounds) on the same training sentences, organisations and partitions (the
same config builds both), batch size, local epochs, rounds and target; its epsilon comes from the run's
``summary.json``, its upload from its real ClientApp's replies for one organisation in round 1
(``communication.plain_round``).

    python benchmarks/peer_comparison.py out=/tmp/peer                    # CPU default (about 15 min)
    python benchmarks/peer_comparison.py examples=8000 rounds=5 out=/tmp/peer-bigger
    python benchmarks/peer_comparison.py model=tiny examples=240 rounds=2 out=/tmp/x   # the smoke test's run

Writes ``<out>/result.json`` (also printed as the last line) and ``<out>/result.md``.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

from benchmark_settings import parse_settings

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "sst2"
ARMS = ("peer", "fedpriv")

DEFAULTS = {
    "arms": "peer,fedpriv",
    "model": "minilm",
    "examples": 2400,  # training sentences of SST-2 (subsample with the run's seed)
    "max_length": 64,
    "orgs": 8,
    "alpha": 0.5,
    "min_partition_size": 60,
    "rounds": 3,
    "local_epochs": 1,  # the example's train(epochs=1)
    "batch": 32,  # the example's DataLoader batch size
    "epsilon": 8.0,  # the target both arms are set to meet
    "delta": 1e-5,
    "max_grad_norm": 1.0,
    "peer_lr": 0.001,  # the example's SGD learning rate ...
    "peer_momentum": 0.9,  # ... and momentum
    "peer_accountant": "prv",  # what PrivacyEngine() uses unless told otherwise (Opacus 1.6)
    "peer_grad_sample_mode": "hooks",  # make_private's default
    "lr": 0.005,  # fedpriv's learning rate (AdamW)
    "seed": 42,
    "threads": 0,  # torch threads for the peer (0: every CPU)
    "train": str(SST2 / "train.tsv"),
    "dev": str(SST2 / "dev.tsv"),
    "timeout": 3600,  # seconds for the fedpriv run
    "out": "",
}
# Identities as a deployment has them (see communication.py); one node id per organisation.
FIRST_NODE_ID = 0x9E3779B97F4A7C15


def parse_args(argv: list[str]) -> dict:
    args = parse_settings(argv, DEFAULTS, numbers=("delta",))
    unknown = [arm for arm in args["arms"].split(",") if arm not in ARMS]
    if unknown or not args["arms"]:
        raise SystemExit(f"arms: unknown {', '.join(map(repr, unknown))}; known: {', '.join(ARMS)}")
    if args["peer_accountant"] not in ("rdp", "prv"):
        raise SystemExit("peer_accountant: expected rdp or prv")
    if args["rounds"] < 1 or args["orgs"] < 1 or args["batch"] < 1:
        raise SystemExit("rounds, orgs, batch: expected >= 1")
    return args


def utility_args(args: dict) -> dict:
    """Settings in utility_sst2's terms, so that both arms are built by the same overrides."""
    from utility_sst2 import DEFAULTS as UTILITY

    return {
        **UTILITY,
        **{k: args[k] for k in ("model", "examples", "max_length", "orgs", "alpha", "min_partition_size")},
        **{k: args[k] for k in ("rounds", "local_epochs", "batch", "delta", "seed", "train", "dev", "timeout")},
        "dp_lr": args["lr"],
        "device": "cpu",
    }


def fedpriv_overrides(args: dict) -> list[str]:
    from utility_sst2 import arm_overrides, common_overrides

    uargs = utility_args(args)
    return [
        *common_overrides(uargs),
        *arm_overrides(uargs, dp_arm(args)),
        f"privacy.max_grad_norm={args['max_grad_norm']}",
    ]


def dp_arm(args: dict) -> str:
    return f"dp-eps{args['epsilon']:g}"


# --------------------------------------------------------------------------- the peer (Flower's example's way)


def get_weights(model) -> list:
    """Every tensor of the model's state_dict, as the example's get_weights."""
    return [value.detach().cpu().numpy() for value in model.state_dict().values()]


def set_weights(model, weights: list) -> None:
    import torch

    keys = list(model.state_dict().keys())
    model.load_state_dict({k: torch.tensor(v) for k, v in zip(keys, weights, strict=True)}, strict=True)


class PeerObserver:
    """What the benchmark records beside the peer (the example's server never sees it): each round's engine."""

    def __init__(self) -> None:
        self.histories: dict[str, list[list[tuple[float, float, int]]]] = {}
        self.reported: dict[str, list[float]] = {}
        self.train_seconds = 0.0


def make_peer_app(orgs: list, data: dict, sigmas: dict, args: dict, template, pad_token_id: int, observer):
    """The peer's ClientApp: a NumPyClient built per message by client_fn, as in the example."""
    import torch
    from flwr.client import ClientApp, NumPyClient
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader

    from fedpriv.client.evaluation import evaluate
    from fedpriv.client.tokenized import PadCollator

    device = torch.device("cpu")

    class PeerClient(NumPyClient):
        def __init__(self, org) -> None:
            self.org = org
            self.train_data, self.test_data = data[org.name]
            self.model = copy.deepcopy(template)
            self.noise_multiplier = sigmas[org.name]

        def fit(self, parameters, config):
            model = self.model
            set_weights(model, parameters)
            optimizer = torch.optim.SGD(model.parameters(), lr=args["peer_lr"], momentum=args["peer_momentum"])
            loader = DataLoader(
                self.train_data, batch_size=args["batch"], shuffle=True, collate_fn=PadCollator(pad_token_id)
            )
            privacy_engine = PrivacyEngine(accountant=args["peer_accountant"])  # new in every round
            model, optimizer, loader = privacy_engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=args["max_grad_norm"],
                grad_sample_mode=args["peer_grad_sample_mode"],
            )
            started = time.perf_counter()
            criterion = torch.nn.CrossEntropyLoss()
            model.train()
            for _ in range(args["local_epochs"]):
                for input_ids, attention_mask, labels in loader:
                    if len(labels) == 0:  # an empty Poisson batch (probability (1 - q)^n): nothing to train on
                        continue
                    optimizer.zero_grad()
                    criterion(model(input_ids=input_ids, attention_mask=attention_mask).logits, labels).backward()
                    optimizer.step()
            epsilon = privacy_engine.get_epsilon(delta=args["delta"])
            observer.train_seconds += time.perf_counter() - started
            observer.reported.setdefault(self.org.name, []).append(epsilon)
            observer.histories.setdefault(self.org.name, []).append(list(privacy_engine.accountant.history))
            print(f"{self.org.name}: epsilon value for delta={args['delta']} is {epsilon:.2f}", file=sys.stderr)
            weights = get_weights(model._module)
            optimizer.zero_grad(set_to_none=True)
            return weights, len(self.train_data), {}

        def evaluate(self, parameters, config):
            set_weights(self.model, parameters)
            counts = evaluate(
                self.model, self.test_data, num_labels=2, batch_size=64, pad_token_id=pad_token_id, device=device
            )
            return counts.loss, counts.num_examples, {"accuracy": counts.accuracy}

    def client_fn(context):
        return PeerClient(orgs[int(context.node_config["partition-id"])]).to_client()

    return ClientApp(client_fn=client_fn)


def weighted_average(metrics: list[tuple[int, dict]]) -> float:
    """The example's evaluate_metrics_aggregation_fn: accuracy weighted by test examples."""
    return sum(n * m["accuracy"] for n, m in metrics) / sum(n for n, _ in metrics)


def calibrate_peer(orgs: list, args: dict) -> dict:
    """Per organisation: the sigma whose ONE-round report meets the target, and what all rounds needed."""
    from opacus.accountants.utils import get_noise_multiplier

    from fedpriv.privacy.calibration import compute_epsilon, dp_steps_per_epoch

    plans, cache = {}, {}
    for org in orgs:
        n = len(org.train)
        steps = dp_steps_per_epoch(n, args["batch"]) * args["local_epochs"]
        q = 1 / -(-n // args["batch"])  # DPDataLoader's sample rate: 1 / len(loader)
        if (q, steps) in cache:  # the sigmas depend on the sample rate and steps only (PRV calibrations take seconds)
            plans[org.name] = {**cache[q, steps], "train_examples": n}
            continue
        common = {"target_epsilon": args["epsilon"], "target_delta": args["delta"], "sample_rate": q}
        sigma = get_noise_multiplier(**common, steps=steps, accountant=args["peer_accountant"], epsilon_tolerance=0.01)
        total = steps * args["rounds"]
        needed = get_noise_multiplier(**common, steps=total, accountant=args["peer_accountant"], epsilon_tolerance=0.01)
        needed_rdp = get_noise_multiplier(**common, steps=total, accountant="rdp", epsilon_tolerance=0.01)
        plan = {
            "train_examples": n,
            "sample_rate": q,
            "steps_per_round": steps,
            "noise_multiplier": sigma,
            "planned_epsilon_all_rounds_rdp": compute_epsilon(
                noise_multiplier=sigma, sample_rate=q, steps=total, delta=args["delta"], accountant="rdp"
            ),
            "noise_multiplier_needed_all_rounds": needed,
            "noise_multiplier_needed_all_rounds_rdp": needed_rdp,
        }
        cache[q, steps] = plans[org.name] = plan
    return plans


def composed_epsilon(histories: list[list[tuple[float, float, int]]], delta: float, accountant: str) -> float:
    """Epsilon of every round's steps together: one accountant fed all the engines' histories."""
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [tuple(step) for history in histories for step in history]
    return float(acc.get_epsilon(delta=delta))


def run_peer(args: dict, partitions, out: Path) -> dict:
    import torch
    from communication import _context, _server_message, upload_bytes
    from flwr.app import MessageType
    from flwr.common import EvaluateIns, FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server.strategy.aggregate import aggregate
    from flwr.supercore.task_identity import TaskIdentity

    from fedpriv.client.tokenized import tokenize
    from fedpriv.kernel.config import ModelConfig
    from fedpriv.shared_models.builder import build_model, build_tokenizer

    started, cpu_started = time.monotonic(), time.process_time()
    torch.set_num_threads(args["threads"] or os.cpu_count() or 1)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 0x5DEECE66D2B7E151, SUPERLINK_NODE_ID, 1
    orgs, label_names = partitions.orgs, partitions.label_names
    tokenizer = build_tokenizer(args["model"])
    data = {
        org.name: tuple(
            tokenize(part.texts, part.labels, tokenizer, args["max_length"]) for part in (org.train, org.test)
        )
        for org in orgs
    }
    # The full model: every weight trained and exchanged. build_model freezes only the position and
    # token-type embeddings, without which Opacus cannot give BERT correct per-example gradients.
    template = build_model(ModelConfig(name=args["model"], finetuning="full", init_seed=0), label_names)
    plans = calibrate_peer(orgs, args)
    observer = PeerObserver()
    app = make_peer_app(orgs, data, {o: p["noise_multiplier"] for o, p in plans.items()}, args, template,
                        tokenizer.pad_token_id, observer)  # fmt: skip
    contexts = {org.name: _context(FIRST_NODE_ID + i, i, len(orgs)) for i, org in enumerate(orgs)}
    parameters = ndarrays_to_parameters(get_weights(template))
    rounds, uploads = [], []
    sizing = [0.0]  # seconds spent sizing replies (the benchmark's measurement, not the peer's work)

    def sized(reply) -> int:
        begun = time.perf_counter()
        size = upload_bytes(reply)["bytes"]
        sizing[0] += time.perf_counter() - begun
        return size

    for server_round in range(1, args["rounds"] + 1):
        results = []
        round_uploads = {}
        for i, org in enumerate(orgs):
            content = compat.fitins_to_recorddict(FitIns(parameters, {"server_round": server_round}), keep_input=True)
            reply = app(_server_message(content, FIRST_NODE_ID + i, MessageType.TRAIN), contexts[org.name])
            round_uploads[org.name] = {"train_reply_bytes": sized(reply)}
            fit = compat.recorddict_to_fitres(reply.content, keep_input=False)
            results.append((parameters_to_ndarrays(fit.parameters), fit.num_examples))
        parameters = ndarrays_to_parameters(aggregate(results))
        evaluations = []
        for i, org in enumerate(orgs):
            content = compat.evaluateins_to_recorddict(EvaluateIns(parameters, {}), keep_input=True)
            reply = app(_server_message(content, FIRST_NODE_ID + i, MessageType.EVALUATE), contexts[org.name])
            round_uploads[org.name]["evaluate_reply_bytes"] = sized(reply)
            res = compat.recorddict_to_evaluateres(reply.content)
            evaluations.append((res.num_examples, {"accuracy": float(res.metrics["accuracy"])}))
        uploads.append(round_uploads)
        accuracy = weighted_average(evaluations)
        rounds.append(
            {
                "round": server_round,
                "accuracy": accuracy,
                "test_examples": sum(n for n, _ in evaluations),
                "reported_epsilon": {o: observer.reported[o][-1] for o in observer.reported},
                "elapsed_s": round(time.monotonic() - started, 1),
            }
        )
        print(f"[peer round {server_round}/{args['rounds']}] accuracy {accuracy:.3f}", file=sys.stderr, flush=True)
    per_org = {}
    for org in orgs:
        histories = observer.histories[org.name]
        per_org[org.name] = {
            **plans[org.name],
            "reported_epsilon_per_round": observer.reported[org.name],
            "steps_recorded": sum(steps for history in histories for _, _, steps in history),
            "actual_epsilon_rdp": composed_epsilon(histories, args["delta"], "rdp"),
            f"actual_epsilon_{args['peer_accountant']}": composed_epsilon(
                histories, args["delta"], args["peer_accountant"]
            ),
        }
    trained = sum(p.numel() for p in template.parameters() if p.requires_grad)
    train_bytes = [u["train_reply_bytes"] for r in uploads for u in r.values()]
    eval_bytes = [u["evaluate_reply_bytes"] for r in uploads for u in r.values()]
    return {
        "arm": "peer",
        "how": "Flower examples/opacus style: new PrivacyEngine per round, full model, per-round get_epsilon",
        "model": f"{args['model']} (full fine-tuning)",
        "trainable_params": trained,
        "exchanged_params": sum(int(v.size) for v in get_weights(template)),
        "accountant": args["peer_accountant"],
        "accuracy": rounds[-1]["accuracy"],
        "accuracy_per_round": [r["accuracy"] for r in rounds],
        "test_examples": rounds[-1]["test_examples"],
        "rounds": rounds,
        "orgs": per_org,
        "reported_epsilon_max": max(max(p["reported_epsilon_per_round"]) for p in per_org.values()),
        "actual_epsilon_rdp_max": max(p["actual_epsilon_rdp"] for p in per_org.values()),
        f"actual_epsilon_{args['peer_accountant']}_max": max(
            p[f"actual_epsilon_{args['peer_accountant']}"] for p in per_org.values()
        ),
        "noise_multiplier_range": _range(p["noise_multiplier"] for p in per_org.values()),
        "noise_multiplier_needed_range": _range(p["noise_multiplier_needed_all_rounds"] for p in per_org.values()),
        "upload_bytes_per_node_round": round(sum(train_bytes + eval_bytes) / len(train_bytes)),
        "train_reply_bytes_mean": round(sum(train_bytes) / len(train_bytes)),
        "evaluate_reply_bytes_mean": round(sum(eval_bytes) / len(eval_bytes)),
        "upload_bytes_total": sum(train_bytes + eval_bytes),
        "train_seconds": round(observer.train_seconds, 1),
        "sizing_seconds": round(sizing[0], 1),  # included in wall_s and cpu_s
        "wall_s": round(time.monotonic() - started, 1),
        "cpu_s": round(time.process_time() - cpu_started, 1),
        "status": "completed",
    }


def _range(values) -> list[float]:
    values = list(values)
    return [round(min(values), 4), round(max(values), 4)]


# --------------------------------------------------------------------------- this project


def fedpriv_upload(cfg, out: Path) -> dict:
    """One organisation's real replies (train + evaluate) in round 1, sized as a SuperNode ships them."""
    import torch
    from communication import plain_round
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from fedpriv.client.client_app import build_client_app
    from fedpriv.client.node import fresh_model
    from fedpriv.data.partitioning import plan_partitions

    torch.set_num_threads(os.cpu_count() or 1)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 0x5DEECE66D2B7E151, SUPERLINK_NODE_ID, 1
    template, digest = fresh_model(cfg.model, plan_partitions(cfg).label_names)
    measured = plain_round(cfg, build_client_app(cfg), template, digest, out / "upload-measurement")
    arrays = measured["arrays"]
    return {
        "exchanged_params": sum(int(a.numpy().size) for a in arrays.values()),
        "train_reply_bytes": measured["train_reply_bytes"],
        "evaluate_reply_bytes": measured["evaluate_reply_bytes"],
    }


def run_fedpriv(args: dict, cfg, out: Path) -> dict:
    from utility_sst2 import run_arm

    run = run_arm(utility_args(args) | {"out": str(out)}, dp_arm(args), out)
    run["arm"] = "fedpriv"
    run["how"] = "fedpriv simulate: LoRA + head exchanged, one accountant per organisation never reset"
    if run.get("status") == "completed":
        upload = fedpriv_upload(cfg, out)
        per_round = upload["train_reply_bytes"] + upload["evaluate_reply_bytes"]
        rounds_trained = len(run.get("accuracy_per_round", []))
        run.update(
            exchanged_params=upload["exchanged_params"],
            train_reply_bytes_mean=upload["train_reply_bytes"],
            evaluate_reply_bytes_mean=upload["evaluate_reply_bytes"],
            upload_bytes_per_node_round=per_round,
            upload_bytes_total=per_round * rounds_trained * len(run.get("org_train_examples") or {}),
        )
    return run


# --------------------------------------------------------------------------- report


def markdown(result: dict) -> str:
    def mb(value) -> str:
        return "-" if value is None else f"{value / 1e6:,.2f} MB"

    lines = [
        "| arm | exchanged parameters | upload per node and round | upload, all nodes and rounds"
        " | noise multiplier | epsilon reported | epsilon actually spent (RDP, all rounds) | accuracy | wall | CPU time |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for a in result["arms"]:
        if a["arm"] == "peer":
            sigma = "{:.3f}-{:.3f}".format(*a["noise_multiplier_range"])
            reported = f"{a['reported_epsilon_max']:.2f} (per round, {a['accountant'].upper()})"
            actual = f"{a['actual_epsilon_rdp_max']:.2f}"
        else:
            sigmas = a.get("noise_multiplier") or {}
            sigma = f"{min(sigmas.values()):.3f}-{max(sigmas.values()):.3f}" if sigmas else "-"
            spent = a.get("epsilon_spent_max")
            reported = "-" if spent is None else f"{spent:.2f} (whole run, RDP)"
            actual = "-" if spent is None else f"{spent:.2f}"
        accuracy = "-" if a.get("accuracy") is None else f"{a['accuracy']:.3f}"
        lines.append(
            f"| {a['arm']} | {a.get('exchanged_params', 0):,} | {mb(a.get('upload_bytes_per_node_round'))}"
            f" | {mb(a.get('upload_bytes_total'))} | {sigma} | {reported} | {actual} | {accuracy}"
            f" | {a.get('wall_s', 0):.0f} s | {a.get('cpu_s', 0):.0f} s |"
        )
    peer = next((a for a in result["arms"] if a["arm"] == "peer"), None)
    if peer:
        lines += [
            "",
            f"Peer: to meet epsilon {result['settings']['epsilon']:g} over all {result['settings']['rounds']} rounds"
            f" its organisations needed noise multipliers {peer['noise_multiplier_needed_range'][0]:.3f}-"
            f"{peer['noise_multiplier_needed_range'][1]:.3f} ({peer['accountant'].upper()}), not the"
            f" {peer['noise_multiplier_range'][0]:.3f}-{peer['noise_multiplier_range'][1]:.3f} that make each"
            " round's report equal the target.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> dict:
    from utility_sst2 import prepare

    args = parse_args(argv)
    out = prepare(args, "fedpriv-peer-bench-")
    import warnings

    warnings.filterwarnings("ignore")
    from fedpriv.data.partitioning import plan_partitions
    from fedpriv.kernel.config import load_config
    from fedpriv.kernel.quiet import quiet_third_party_warnings

    quiet_third_party_warnings()
    cfg = load_config(overrides=fedpriv_overrides(args))
    partitions = plan_partitions(cfg)  # the organisations both arms train: the same config builds them
    arms = []
    for arm in args["arms"].split(","):
        arms.append(run_peer(args, partitions, out) if arm == "peer" else run_fedpriv(args, cfg, out))
    result = {
        "benchmark": "peer_comparison",
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "settings": {k: v for k, v in args.items() if k != "out"},
        "orgs": {o.name: {"train": len(o.train), "test": len(o.test)} for o in partitions.orgs},
        "arms": arms,
        "ok": all(a.get("complete", a.get("status") == "completed") for a in arms),
        "out": str(out),
    }
    (out / "result.md").write_text(markdown(result), encoding="utf-8")
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv[1:])["ok"] else 1)
