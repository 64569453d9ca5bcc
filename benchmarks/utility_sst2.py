"""Utility on SST-2: what DP costs in accuracy, against centralised and federated non-private training.

Every arm is the product itself: ``fedpriv simulate`` (a subprocess, Flower's simulation engine on Ray) with
``key=value`` overrides, on the same training sentences (``../shared/data/sst2/train.tsv``, column
``sentence``, subsampled with the run's seed when ``examples`` > 0) and the same test set (the 872 sentences
of ``dev.tsv``, column ``content``: each organisation evaluates the global model on its share of them, and
the run's accuracy is correct / total over all 872):

- ``central``: one organisation holds all the training data, privacy off (the same pipeline, one node,
  all of the machine's CPUs for it);
- ``federated``: ``orgs`` organisations, Dirichlet ``alpha`` label skew, privacy off;
- ``dp-epsN``: the same organisations with DP-SGD at target epsilon N (``epsilons``), delta ``delta``; each
  organisation's noise is calibrated once for all its planned rounds, and the epsilon it really spent is read
  from the run's ``summary.json`` privacy entries.

Model: ``model`` (default all-MiniLM-L6-v2 + LoRA r=8 on query/value, the packaged default, with ``pooling``
auto = its mean-pooled sentence embedding under the head). Learning rates: ``central_lr`` for the central arm,
``lr`` for the federated non-private arm, ``dp_lr`` for the DP arms (each arm's best found), each on
``lr_schedule`` across the rounds (see BENCHMARKS.md for what was tried). Goal reported: DP at epsilon 8 within
``goal_points`` accuracy points of ``central``.

Two settings: ``setting=cpu`` (default; a subsample sized for about 30 minutes on 2 idle CPU cores) and
``setting=gpu`` (all 67,349 sentences, more rounds; for a machine with a CUDA GPU). Any key given on the
command line overrides the setting's value.

    python benchmarks/utility_sst2.py out=/tmp/sst2-utility              # CPU setting, all five arms
    python benchmarks/utility_sst2.py setting=gpu out=/tmp/sst2-utility-gpu
    python benchmarks/utility_sst2.py arms=federated,dp epsilons=8 rounds=1 out=/tmp/lr-sweep dp_lr=0.002
    python benchmarks/utility_sst2.py model=tiny examples=300 rounds=1 out=/tmp/x   # smoke run (the test)

Writes ``<out>/result.json`` (also printed as the last line), ``<out>/result.md`` (the table) and
``<out>/accuracy_vs_epsilon.png``; each arm's run folder and log stay under ``out``.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmark_settings import parse_settings
from simulation_scale import TreeSampler, _stop_tree, tree_pids

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "sst2"
ARMS = ("central", "federated", "dp")
_DP_ARM = re.compile(r"dp-eps\d+(\.\d+)?")  # one DP arm by name, e.g. arms=dp-eps8,central: arms run in the order given
_PLAN_LINE = re.compile(r"^\s+(\S+)\s+train\s+(\d+)\s+test\s+(\d+)")

DEFAULTS = {
    "setting": "cpu",  # cpu | gpu: the preset below; keys given on the command line override it
    "arms": "central,federated,dp",  # dp = one arm per value of epsilons
    "epsilons": "1,3,8",
    "delta": 1e-5,
    "accountant": "rdp",  # privacy.accountant: rdp | prv (PRV: a tighter epsilon for the same noise)
    "model": "minilm",
    "examples": 8000,  # training sentences (subsample of train.tsv with the run's seed); 0 = all 67,349
    "max_length": 64,  # tokens; SST-2 training phrases average 13, dev sentences 25 (longest 60)
    "orgs": 8,
    "alpha": 0.5,
    "min_partition_size": 200,  # the Dirichlet split is redrawn until every organisation holds this many rows
    "rounds": 6,
    "local_epochs": 1,
    "batch": 128,  # expected Poisson batch under DP (the same batch size without DP)
    "max_batch_tokens": 512,  # length-sorted micro-batches of at most this many padded tokens; 0 = one pass
    "central_lr": 0.002,  # the central arm (AdamW; 0.01 gave 0.79-0.80: 63 steps a round overshoot)
    "lr": 0.01,  # the federated non-private arm (AdamW; 0.002 gave 0.796, 0.005 0.825, 0.01 0.841)
    "dp_lr": 0.01,  # DP arms
    "dp_optimizer": "adamw",  # DP arms: adamw | sgd (the non-private arms use AdamW)
    "lr_schedule": "cosine",  # every arm: from its learning rate in round 1 to min_lr_ratio of it in the last
    "min_lr_ratio": 0.1,
    "pooling": "auto",  # model.pooling (auto: mean for all-MiniLM-L6-v2)
    "freeze_a": False,  # model.lora.freeze_a: train LoRA's B matrices only (FFA-LoRA)
    "lora_alpha": 16.0,  # model.lora.alpha (the update B·A is scaled by alpha / r)
    "seed": 42,
    "device": "cpu",
    "client_cpus": 1,  # CPUs per virtual organisation (Ray); the central arm gets central_cpus
    "client_gpus": 0.0,
    "central_cpus": 0,  # 0: every CPU of the machine
    "goal_points": 3.0,
    "train": str(SST2 / "train.tsv"),
    "dev": str(SST2 / "dev.tsv"),
    "timeout": 7200,  # seconds per arm
    "out": "",
}
PRESETS = {
    "cpu": {},
    "gpu": {  # all of SST-2, ten rounds; two organisations share the GPU at a time
        "examples": 0,
        "rounds": 10,
        "local_epochs": 1,
        "batch": 512,
        "min_partition_size": 1000,  # alpha 0.5 over all of SST-2 gives one organisation ~200 rows at 200
        "max_batch_tokens": 0,  # one pass per batch: a GPU has the memory
        "device": "auto",
        "client_cpus": 2,
        "client_gpus": 0.5,
        "timeout": 14400,
    },
}


def parse_args(argv: list[str]) -> dict:
    given = {item.partition("=")[0] for item in argv}
    args = parse_settings(argv, DEFAULTS, numbers=("delta",))
    if args["setting"] not in PRESETS:
        raise SystemExit(f"setting: unknown {args['setting']!r}; known: {', '.join(PRESETS)}")
    for key, value in PRESETS[args["setting"]].items():
        if key not in given:
            args[key] = value
    unknown = [arm for arm in args["arms"].split(",") if arm not in ARMS and not _DP_ARM.fullmatch(arm)]
    if unknown or not args["arms"]:
        raise SystemExit(f"arms: unknown {', '.join(map(repr, unknown))}; known: {', '.join(ARMS)}")
    try:
        args["epsilon_list"] = [float(e) for e in str(args["epsilons"]).split(",") if e.strip()]
    except ValueError:
        raise SystemExit(f"epsilons={args['epsilons']}: expected numbers separated by commas, e.g. 1,3,8") from None
    if "dp" in args["arms"].split(",") and not args["epsilon_list"]:
        raise SystemExit("epsilons: expected at least one target epsilon for the dp arms")
    for key in ("orgs", "rounds", "local_epochs", "batch"):
        if args[key] < 1:
            raise SystemExit(f"{key}: expected >= 1")
    return args


def arm_names(args: dict) -> list[str]:
    names = []
    for arm in args["arms"].split(","):
        names += [f"dp-eps{e:g}" for e in args["epsilon_list"]] if arm == "dp" else [arm]
    return list(dict.fromkeys(names))  # an arm named twice runs once


def common_overrides(args: dict) -> list[str]:
    items = [
        "data.source=file",
        f"data.path={args['train']}",
        "data.format=tsv",
        "data.text_column=sentence",
        "data.label_column=label",
        f"data.test_path={args['dev']}",
        "data.test_text_column=content",
        "data.labels.map={'0': negative, '1': positive}",
        f"data.max_length={args['max_length']}",
        f"model.name={args['model']}",
        f"training.rounds={args['rounds']}",
        f"training.local_epochs={args['local_epochs']}",
        f"training.batch_size={args['batch']}",
        f"training.device={args['device']}",
        f"training.lr_schedule={args['lr_schedule']}",
        f"training.min_lr_ratio={args['min_lr_ratio']}",
        f"model.pooling={args['pooling']}",
        f"model.lora.freeze_a={str(args['freeze_a']).lower()}",
        f"model.lora.alpha={args['lora_alpha']}",
        f"run.seed={args['seed']}",
        "output.export_model=false",
        "output.keep_checkpoints=1",
    ]
    if args["examples"] > 0:
        items.append(f"data.max_examples={args['examples']}")
    if args["max_batch_tokens"] > 0:
        items.append(f"training.max_batch_tokens={args['max_batch_tokens']}")
    return items


def arm_overrides(args: dict, arm: str) -> list[str]:
    """``fedpriv simulate`` overrides of one arm (on top of :func:`common_overrides`)."""
    if arm == "central":
        cpus = args["central_cpus"] or os.cpu_count() or 1
        gpus = 1.0 if args["client_gpus"] > 0 else 0.0
        return [
            "partitioning.scheme=iid",
            "partitioning.num_orgs=1",
            "strategy.min_train_nodes=1",
            "strategy.min_evaluate_nodes=1",
            "privacy.enabled=false",
            f"training.learning_rate={args['central_lr']}",
            f"simulation.client_resources={{num_cpus: {cpus}, num_gpus: {gpus}}}",
        ]
    items = [
        "partitioning.scheme=dirichlet",
        f"partitioning.alpha={args['alpha']}",
        f"partitioning.num_orgs={args['orgs']}",
        f"partitioning.min_partition_size={args['min_partition_size']}",
        f"simulation.client_resources={{num_cpus: {args['client_cpus']}, num_gpus: {args['client_gpus']}}}",
    ]
    if arm == "federated":
        return [*items, "privacy.enabled=false", f"training.learning_rate={args['lr']}"]
    epsilon = float(arm.removeprefix("dp-eps"))
    return [
        *items,
        "privacy.enabled=true",
        f"privacy.target_epsilon={epsilon}",
        f"privacy.delta={args['delta']}",
        f"privacy.accountant={args['accountant']}",
        f"training.learning_rate={args['dp_lr']}",
        f"training.optimizer={args['dp_optimizer']}",
    ]


def run_arm(args: dict, arm: str, out: Path) -> dict:
    run_dir, log_path = out / arm, out / f"{arm}.log"
    command = [
        sys.executable, "-m", "fedpriv.cli", "simulate",
        *common_overrides(args), *arm_overrides(args, arm), "--out", str(run_dir),
    ]  # fmt: skip
    started, load_before = time.monotonic(), os.getloadavg()[0]
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        proc = subprocess.Popen(
            command, cwd=out, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        clock = TreeCpu(proc.pid)
        clock.start()
        try:
            proc.wait(timeout=args["timeout"])
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop_tree(proc, set(tree_pids(proc.pid)) - {proc.pid})
        finally:
            clock.stop()
    result = {
        "arm": arm,
        "returncode": proc.returncode,
        "timed_out": timed_out,
        "wall_s": round(time.monotonic() - started, 1),
        "cpu_s": round(clock.seconds, 1),  # user + system CPU of the run's whole process tree (Ray included)
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # 1-minute, at start and end
        "log": str(log_path),
    }
    row = {**result, **plan_sizes(log_path), **read_summary(run_dir)}
    orgs = len(row["org_train_examples"])
    row["full_participation"] = bool(orgs) and all(
        n == orgs for key in ("orgs_trained_per_round", "orgs_evaluated_per_round") for n in row.get(key, [0])
    )
    row["complete"] = row.get("status") == "completed" and row["full_participation"]
    return row


class TreeCpu(TreeSampler):
    """CPU seconds (user + system) of a process and its descendants, sampled from /proc every second.

    On a shared machine the wall time depends on what else runs; the CPU time of the run itself does not
    (much): CPU seconds / cores estimates the wall time on an idle machine.
    """

    def __init__(self, root: int, interval: float = 1.0):
        super().__init__(root, interval)
        self.per_pid: dict[int, float] = {}

    def sample(self) -> None:
        for pid in tree_pids(self.root):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            self.per_pid[pid] = max(self.per_pid.get(pid, 0.0), seconds)

    @property
    def seconds(self) -> float:
        return sum(self.per_pid.values())


def read_summary(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    if not path.is_file():
        return {"status": "failed", "run_dir": str(run_dir)}
    summary = json.loads(path.read_text(encoding="utf-8"))
    final = summary.get("final") or {}
    privacy = summary.get("privacy") or {}
    config = summary.get("config") or {}
    row = {
        "status": summary.get("status"),
        "run_dir": str(run_dir),
        "orgs": config.get("partitioning", {}).get("num_orgs"),
        "dp": bool(summary.get("dp_enabled")),
        "learning_rate": config.get("training", {}).get("learning_rate"),
        "accuracy": final.get("accuracy"),
        "macro_f1": final.get("macro_f1"),
        "loss": final.get("loss"),
        "accuracy_per_round": [r.get("accuracy") for r in summary.get("rounds", [])],
        # a node killed (out of memory, a crash) leaves the round to the others: count who really took part
        "orgs_trained_per_round": [len(r.get("trained_orgs") or []) for r in summary.get("rounds", [])],
        "orgs_evaluated_per_round": [len(r.get("org_accuracy") or {}) for r in summary.get("rounds", [])],
        "simulation_wall_s": summary.get("wall_time_s"),
    }
    if summary.get("dp_enabled") and privacy:
        epsilons = [p["epsilon"] for p in privacy.values()]
        row.update(
            target_epsilon=next(iter(privacy.values()))["target_epsilon"],
            delta=next(iter(privacy.values()))["delta"],
            epsilon_spent_max=max(epsilons),
            epsilon_spent_min=min(epsilons),
            epsilon_spent={org: p["epsilon"] for org, p in privacy.items()},
            noise_multiplier={org: p["noise_multiplier"] for org, p in privacy.items()},
            sample_rate={org: p["sample_rate"] for org, p in privacy.items()},
            steps={org: p["steps"] for org, p in privacy.items()},
            accountant=next(iter(privacy.values())).get("accountant"),
        )
    return row


def plan_sizes(log_path: Path) -> dict:
    """Training and test examples per organisation, from the plan ``fedpriv simulate`` prints first."""
    train, test = {}, {}
    if log_path.is_file():
        for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            if match := _PLAN_LINE.match(line):
                train[match.group(1)], test[match.group(1)] = int(match.group(2)), int(match.group(3))
    return {"train_examples": sum(train.values()), "test_examples": sum(test.values()), "org_train_examples": train}


def dev_labels(path: str) -> list[int]:
    with open(path, encoding="utf-8", newline="") as handle:
        return [int(row["label"]) for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)]


def goal(arms: list[dict], points: float) -> dict:
    by_name = {a["arm"]: a for a in arms}
    central, dp8 = by_name.get("central", {}), by_name.get("dp-eps8", {})
    if central.get("accuracy") is None or dp8.get("accuracy") is None:
        return {"target": f"dp-eps8 within {points:g} points of central", "met": None, "reason": "arm missing"}
    gap = round(100 * (central["accuracy"] - dp8["accuracy"]), 2)
    return {"target": f"dp-eps8 within {points:g} points of central", "gap_points": gap, "met": gap <= points}


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    lines = [
        "| arm | organisations | privacy | target epsilon | epsilon spent (max over orgs) | noise multiplier"
        " | accuracy (872 dev) | macro-F1 | wall | CPU time |",
        "|---|---:|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for a in result["arms"]:
        sigmas = a.get("noise_multiplier")
        sigma = f"{min(sigmas.values()):.3f}-{max(sigmas.values()):.3f}" if sigmas else "-"
        lines.append(
            f"| {a['arm']} | {a.get('orgs', '-')} | {'DP-SGD' if a.get('dp') else 'off'}"
            f" | {_fmt(a.get('target_epsilon'), 'g')} | {_fmt(a.get('epsilon_spent_max'))} | {sigma}"
            f" | {_fmt(a.get('accuracy'))} | {_fmt(a.get('macro_f1'))} | {_fmt(a.get('wall_s'), '.0f')} s"
            f" | {_fmt(a.get('cpu_s'), '.0f')} s |"
        )
    g = result["goal"]
    verdict = {True: "met", False: "not met", None: "not measured"}[g["met"]]
    gap = f" (gap {g['gap_points']:.1f} points)" if "gap_points" in g else ""
    lines += ["", f"Goal ({g['target']}): {verdict}{gap}. Majority class: {result['majority_accuracy']:.3f}."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    dp = sorted((a for a in result["arms"] if a.get("dp") and a.get("accuracy") is not None),
                key=lambda a: a["epsilon_spent_max"])  # fmt: skip
    if dp:
        ax.plot([a["epsilon_spent_max"] for a in dp], [a["accuracy"] for a in dp], "o-", label="federated DP-SGD")
        for a in dp:
            ax.annotate(f"{a['accuracy']:.3f}", (a["epsilon_spent_max"], a["accuracy"]),
                        textcoords="offset points", xytext=(4, 6), fontsize=8)  # fmt: skip
    styles = {"central": ("black", "--", "centralised, non-private"), "federated": ("tab:green", ":", "federated, non-private")}  # fmt: skip
    for a in result["arms"]:
        if a["arm"] in styles and a.get("accuracy") is not None:
            color, line, label = styles[a["arm"]]
            ax.axhline(a["accuracy"], color=color, linestyle=line, label=f"{label} ({a['accuracy']:.3f})")
    ax.axhline(result["majority_accuracy"], color="grey", linewidth=0.8, label="majority class")
    ax.set_xscale("log")
    if dp:  # ticks at the epsilons measured, as plain numbers (not 2 x 10^0)
        ax.set_xticks([a["epsilon_spent_max"] for a in dp], [f"{a['epsilon_spent_max']:.2g}" for a in dp])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(f"epsilon spent (max over organisations, delta {result['settings']['delta']:g})")
    ax.set_ylabel("accuracy on SST-2 dev (872 sentences)")
    s = result["settings"]
    ax.set_title(
        f"SST-2, {s['model']} + LoRA, {s['orgs']} orgs (Dirichlet {s['alpha']:g}), {s['rounds']} rounds", fontsize=9
    )
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def prepare(args: dict, prefix: str) -> Path:
    """Check that SST-2 is there; the (new or empty) output folder, made."""
    for key in ("train", "dev"):
        if not Path(args[key]).is_file():
            raise SystemExit(f"{key}={args[key]}: not found (SST-2; see ../shared/data/README.md)")
    out = Path(args["out"]) if args["out"] else Path(tempfile.mkdtemp(prefix=prefix))
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"out={out}: not empty; name a new folder")
    out.mkdir(parents=True, exist_ok=True)
    return out.resolve()


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    out = prepare(args, "fedpriv-sst2-utility-")
    labels = dev_labels(args["dev"])
    arms = []
    for arm in arm_names(args):
        arms.append(run_arm(args, arm, out))
        print(json.dumps({k: arms[-1].get(k) for k in ("arm", "status", "accuracy", "epsilon_spent_max", "wall_s")}),
              file=sys.stderr, flush=True)  # fmt: skip
        result = write_result(args, arms, labels, out)  # after every arm: a long run stopped early keeps its table
    print(json.dumps(result))
    return result


def write_result(args: dict, arms: list[dict], labels: list[int], out: Path) -> dict:
    settings = {k: v for k, v in args.items() if k not in ("out", "epsilon_list")}
    result = {
        "benchmark": "utility_sst2",
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "settings": settings,
        "dev_examples": len(labels),
        "majority_accuracy": round(max(labels.count(0), labels.count(1)) / len(labels), 4),
        "arms": arms,
        "goal": goal(arms, args["goal_points"]),
        "total_wall_s": round(sum(a["wall_s"] for a in arms), 1),
        "ok": all(a["complete"] for a in arms),  # every organisation trained and evaluated in every round
        "out": str(out),
        "table": str(out / "result.md"),
        "plot": str(out / "accuracy_vs_epsilon.png"),
    }
    (out / "result.md").write_text(markdown(result), encoding="utf-8")
    plot(result, out / "accuracy_vs_epsilon.png")
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv[1:])["ok"] else 1)
