"""What TLS + SecAgg+ cost per round, against the same round in plaintext, with real processes.

Builds a federation of N organisations, each with its own CSV of BBC News
articles, and runs it with ``fedpriv federation up`` twice per update kind:
once as deployed (TLS, SuperNode authentication, SecAgg+) and once as the
plaintext baseline (no TLS, no node authentication, plain FedAvg). Everything
else is equal: the model, DP-SGD, the data, the rounds. Round wall times come
from each run's summary.json; ``FEDPRIV_STAGE_TIMINGS`` makes every ClientApp
message report how long its process took to start and where the handler's
time went, which shows what a SecAgg+ round pays for.

It also reports each round's wall time over the slowest node's local compute
(its DP training loop plus its evaluation loop, from the same timings): what a
round costs beyond the work no framework can avoid. Round 1 starts when the
coordinator's pre-flight ended (server/preflight.py: every node loads its data
and model and calibrates its noise before round 1); its time is reported
apart (``preflight_s``), and with it the whole run's wall time over the nodes'
compute (``run_over_compute``); ``preflight=never`` leaves that work in round 1. ``supernodes=fedpriv,flower``
runs each arm with fedpriv-supernode (warm, forked ClientApps) and with Flower's
stock flower-supernode (a fresh interpreter per message); ``superlinks=fedpriv,flower``
with fedpriv-superlink (a node's empty pull held until a message is sent) and
with Flower's stock flower-superlink.

    python benchmarks/secure_round_overhead.py                       # 10 nodes, LoRA and full model
    python benchmarks/secure_round_overhead.py nodes=10 updates=lora modes=secure supernodes=fedpriv,flower
    python benchmarks/secure_round_overhead.py nodes=4 rounds=2 updates=lora model=tiny out=/tmp/overhead
    python benchmarks/secure_round_overhead.py ... reruns=1      # and once more on the same kits (cached data)

Prints progress, then a Markdown table; writes the raw numbers to OUT/overhead.json.
"""

from __future__ import annotations

import csv
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml
from benchmark_settings import parse_settings

DEFAULTS = {
    "nodes": 10, "rounds": 3, "examples": 40, "updates": "lora,full", "model": "minilm",
    "batch": 16, "max_length": 64, "out": "", "modes": "secure,plaintext", "supernodes": "fedpriv",
    "max_batch_tokens": 0,  # > 0: training.max_batch_tokens (length-sorted micro-batches: less memory per node)
    "threads": 0,  # torch/OpenMP threads per node (OMP_NUM_THREADS); 0: the machine's CPUs / nodes, at least 1
    "reruns": 0,  # more runs of each arm on its kits (privacy state cleared, token caches kept): a later run's rounds
    "superlinks": "fedpriv",
    "preflight": "auto",  # strategy.preflight: auto (deployment: on) or never (each node loads its data in round 1)
}  # fmt: skip
MODES = ("secure", "plaintext")
SUPERNODES = {"fedpriv": "fedpriv-supernode", "flower": "flower-supernode"}  # warm ClientApps / Flower's stock
SUPERLINKS = {"fedpriv": "fedpriv-superlink", "flower": "flower-superlink"}  # held pulls / Flower's stock
COMPUTE_PHASES = ("train", "evaluate")  # the work any framework must do: the DP training loop, the evaluation


def parse(argv: list[str]) -> dict:
    return parse_settings(argv, DEFAULTS)


def write_federation(root: Path, nodes: int, examples: int) -> Path:
    """N organisations, each with ``examples`` distinct BBC News articles of its own (IID)."""
    from fedpriv.data.corpora import load_bbc_news

    texts, labels = load_bbc_news()
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    if nodes * examples > len(order):
        raise SystemExit(f"{nodes} x {examples} examples: the corpus has {len(order)}")
    orgs = []
    for index in range(nodes):
        name = f"org-{index:02d}"
        with (root / f"{name}.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            for row in order[index * examples : (index + 1) * examples]:
                writer.writerow([texts[row], labels[row]])
        orgs.append(
            {"name": name, "device": "cpu", "privacy": {"target_epsilon": 8.0}, "data": {"path": f"{name}.csv"}}
        )
    path = root / "FEDERATION.yaml"
    federation = {"federation": "overhead-bench", "coordinator": {"addresses": ["127.0.0.1"]}, "organisations": orgs}
    path.write_text(yaml.safe_dump(federation, sort_keys=False), encoding="utf-8")
    return path


def round_times(summary: dict) -> list[float]:
    """Each round's wall time; round 1 starts when the pre-flight ended (at the run's start without one)."""
    elapsed = [float(summary.get("preflight", {}).get("elapsed_s", 0.0))]
    elapsed += [float(r["elapsed_s"]) for r in summary["rounds"]]
    return [round(b - a, 2) for a, b in zip(elapsed, elapsed[1:], strict=False)]


def read_stages(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def node_compute(entries: list[dict], rounds: int) -> list[float]:
    """Per round: the slowest node's local compute (its training loop + evaluation loop over all its messages)."""
    per_round: list[float] = []
    for server_round in range(1, rounds + 1):
        by_node: dict[int, float] = {}
        for entry in entries:
            if str(entry["round"]) == str(server_round):
                work = sum(entry["phases"].get(name, 0.0) for name in COMPUTE_PHASES)
                by_node[entry["node_id"]] = by_node.get(entry["node_id"], 0.0) + work
        per_round.append(round(max(by_node.values(), default=0.0), 2))
    return per_round


def stage_table(path: Path) -> dict[str, dict]:
    """Per message kind: count, median process start-up, median handler time and its phases."""
    by_stage: dict[str, list[dict]] = {}
    for entry in read_stages(path):
        by_stage.setdefault(entry["stage"], []).append(entry)
    table = {}
    for stage, entries in sorted(by_stage.items()):
        phases = sorted({name for e in entries for name in e["phases"]})
        table[stage] = {
            "messages": len(entries),
            "startup_s": round(statistics.median(e["started_after_s"] for e in entries), 2),
            "handler_s": round(statistics.median(e["handler_s"] for e in entries), 2),
            "phases_s": {p: round(statistics.median(e["phases"].get(p, 0.0) for e in entries), 2) for p in phases},
            "peak_rss_mb": max((e.get("peak_rss_mb", 0.0) for e in entries), default=0.0),
        }
    return table


def clear_privacy_state(kits: Path) -> None:
    """Every organisation's privacy state (plan, accountant, ledger, stored replies) gone, its token cache kept.

    What a federation's next run on the same data starts from: the node redacted and tokenised its texts in an
    earlier run and reads them from its cache. Benchmarks only: a real node's spent budget is never deleted.
    """
    import shutil

    from fedpriv.client.node import TOKEN_CACHE_DIR

    for state in kits.glob("*/state"):
        for item in state.iterdir():
            if item.name != TOKEN_CACHE_DIR:
                shutil.rmtree(item) if item.is_dir() else item.unlink()


def run_one(
    root: Path,
    federation: Path,
    args: dict,
    update: str,
    mode: str,
    supernode: str = "fedpriv",
    rerun: int = 0,
    superlink: str = "fedpriv",
) -> dict:
    from fedpriv.commands.local_federation import federation_up
    from fedpriv.commands.provisioning.kit_templates import SUPERLINK_ENV, SUPERNODE_ENV

    arm = {"update": update, "mode": mode, "supernode": supernode, "superlink": superlink, "run": rerun + 1}
    label = _label(arm)
    link = ("" if superlink == "fedpriv" else f"-{superlink}-link") + (
        "" if args["preflight"] == "auto" else f"-preflight-{args['preflight']}"
    )
    kits = root / f"kits-{update}-{mode}-{supernode}{link}"
    tag = f"{update}-{mode}-{supernode}{link}" + (f"-run{rerun + 1}" if rerun else "")
    if rerun:
        clear_privacy_state(kits)
    timings = root / f"stages-{tag}.jsonl"
    overrides = [
        f"model.name={args['model']}",
        f"model.finetuning={update}",
        "training.local_epochs=1",
        f"training.batch_size={args['batch']}",
        f"data.max_length={args['max_length']}",
        f"secure_aggregation.enabled={'true' if mode == 'secure' else 'false'}",
        "output.export_model=false",
        f"strategy.preflight={args['preflight']}",
    ]
    if args["max_batch_tokens"] > 0:
        overrides.append(f"training.max_batch_tokens={args['max_batch_tokens']}")
    if update == "full":
        overrides.append("privacy.grad_sample_mode=ghost")  # per-sample gradients of 22M parameters x 10 nodes
    os.environ["FEDPRIV_STAGE_TIMINGS"] = str(timings)  # inherited by every SuperNode's ClientApp processes
    os.environ["FEDPRIV_EXCHANGE_TIMINGS"] = str(root / f"exchanges-{tag}.jsonl")  # and by the ServerApp
    # N nodes share this machine's cores (each would have its own machine in a real federation): more OpenMP
    # threads than cores make them spin at every barrier (10 nodes x 2 threads on 2 cores: load 25, 1.7 cores busy)
    os.environ["OMP_NUM_THREADS"] = str(args["threads"] or max(1, (os.cpu_count() or 1) // args["nodes"]))
    os.environ[SUPERNODE_ENV] = SUPERNODES[supernode]  # read by each kit's start-supernode.sh
    os.environ[SUPERLINK_ENV] = SUPERLINKS[superlink]  # read by start-superlink.sh
    started = time.monotonic()
    try:
        result = federation_up(
            federation,
            kits,
            rounds=args["rounds"],
            overrides=overrides,
            out=root / f"run-{tag}",
            run_timeout=3600,
            plaintext=mode == "plaintext",
            say=lambda line: print(f"  [{label}] {line}", flush=True),
        )
    finally:
        os.environ.pop("FEDPRIV_STAGE_TIMINGS", None)
        os.environ.pop("FEDPRIV_EXCHANGE_TIMINGS", None)
        os.environ.pop(SUPERNODE_ENV, None)
        os.environ.pop(SUPERLINK_ENV, None)
    if result.summary is None or result.returncode != 0:
        raise SystemExit(f"{label}: the run failed (exit {result.returncode}); logs in {result.run_dir / 'logs'}")
    summary = result.summary
    rounds = round_times(summary)
    compute = node_compute(read_stages(timings), len(rounds))
    ratios = [round(wall / work, 3) if work else None for wall, work in zip(rounds, compute, strict=True)]
    return {
        "update": update,
        "mode": mode,
        "supernode": supernode,
        "superlink": superlink,
        "preflight": args["preflight"],
        "run": rerun + 1,  # 1: fresh kits; later: the same kits again (token caches kept)
        "slowest_node_compute_s": compute,
        "round_over_compute": ratios,
        "median_round_over_compute": round(statistics.median(r for r in ratios if r), 3) if any(ratios) else None,
        "trainable_parameters": summary["model"]["trainable_parameters"],
        "upload_bytes_per_round": summary["model"]["upload_bytes_per_round"],
        "round_s": rounds,
        # the nodes' one-time work before round 1 (data, model, noise calibration); None: no pre-flight
        "preflight_s": summary.get("preflight", {}).get("wall_s"),
        "run_s": summary["wall_time_s"],  # the whole run: pre-flight and every round
        "run_over_compute": round(summary["wall_time_s"] / sum(compute), 3) if sum(compute) else None,
        "median_round_s": round(statistics.median(rounds), 2),
        "total_s": round(time.monotonic() - started, 1),
        "final_accuracy": summary["final"]["accuracy"],
        "trained_orgs_per_round": [len(r["trained_orgs"]) for r in summary["rounds"]],
        "stages": stage_table(timings),
    }


def _label(result: dict) -> str:
    label = f"{result['update']}/{result['mode']}/{result['supernode']}"
    label += "" if result.get("superlink", "fedpriv") == "fedpriv" else f" + {result['superlink']}-superlink"
    return label + (f" run {result['run']}" if result["run"] > 1 else "")


def markdown(results: list[dict], args: dict) -> str:
    lines = [
        "| update | trainable parameters | plaintext s/round | TLS + SecAgg+ s/round | ratio |",
        "|---|---|---|---|---|",
    ]
    for update in dict.fromkeys(r["update"] for r in results):
        by_mode = {
            r["mode"]: r for r in results if r["update"] == update and r["supernode"] == "fedpriv" and r["run"] == 1
        }
        plain, secure = by_mode.get("plaintext"), by_mode.get("secure")
        if not plain or not secure:
            continue
        ratio = secure["median_round_s"] / plain["median_round_s"]
        lines.append(
            f"| {update} | {secure['trainable_parameters']:,} | {plain['round_s']} (median {plain['median_round_s']})"
            f" | {secure['round_s']} (median {secure['median_round_s']}) | {ratio:.2f} |"
        )
    lines += [
        "",
        "| run | pre-flight s | s/round | slowest node's compute s (train + evaluate) | round / compute | median |"
        " run / compute |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {_label(r)} | {r['preflight_s'] if r['preflight_s'] is not None else '-'} | {r['round_s']}"
            f" | {r['slowest_node_compute_s']} | {r['round_over_compute']} | **{r['median_round_over_compute']}**"
            f" | {r['run_over_compute']} |"
        )
    lines += [
        "",
        "| run | message | messages | process start-up s | handler s | handler phases s |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        for stage, row in r["stages"].items():
            phases = ", ".join(f"{k} {v}" for k, v in row["phases_s"].items()) or "-"
            lines.append(
                f"| {_label(r)} | {stage} | {row['messages']} | {row['startup_s']} | {row['handler_s']} | {phases} |"
            )
    return "\n".join(lines)


def main(argv: list[str]) -> list[dict]:
    args = parse(argv)
    out = Path(args["out"]) if args["out"] else Path(tempfile.mkdtemp(prefix="fedpriv-overhead-"))
    out.mkdir(parents=True, exist_ok=True)
    federation = write_federation(out, args["nodes"], args["examples"])
    print(f"{args['nodes']} organisations x {args['examples']} articles; {args['rounds']} rounds per run; in {out}")
    results = []
    for update in args["updates"].split(","):
        for mode in args["modes"].split(","):
            if mode not in MODES:
                raise SystemExit(f"modes: {mode!r} is not one of {', '.join(MODES)}")
            for supernode in args["supernodes"].split(","):
                if supernode not in SUPERNODES:
                    raise SystemExit(f"supernodes: {supernode!r} is not one of {', '.join(SUPERNODES)}")
                for superlink in args["superlinks"].split(","):
                    if superlink not in SUPERLINKS:
                        raise SystemExit(f"superlinks: {superlink!r} is not one of {', '.join(SUPERLINKS)}")
                    for rerun in range(args["reruns"] + 1):
                        results.append(run_one(out, federation, args, update, mode, supernode, rerun, superlink))
            (out / "overhead.json").write_text(json.dumps({"settings": args, "results": results}, indent=2))
    print(markdown(results, args))
    print(f"raw numbers: {out / 'overhead.json'}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
