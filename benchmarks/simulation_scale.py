"""How many virtual organisations one ``fedpriv simulate`` holds on this machine, and what each one costs.

Runs the real command (a subprocess, Flower's simulation engine on Ray) with N organisations of the
tiny model, ``sampled`` of them drawn to train (and ``sampled`` to evaluate) in each round, DP on:
every organisation that trains keeps its own accountant state, privacy plan, signing key and signed
ledger under ``<run>/nodes/<org>/``. Records the wall time (and when preflight, round 1 and each
later round ended), the peak memory of the whole process tree (driver, Ray's daemons, the actors),
sampled with psutil (else /proc) as RSS and PSS sums, the run folder's disk use, and checks that
summary.json is complete and that every organisation that trained has its accountant and ledger
(and the coordinator its copy of that ledger).

Data: SST-2 (``../shared/data/sst2/train.tsv``, 67,349 sentences), ``examples_per_org`` rows per
organisation (IID, so every organisation has the same size). The batch size is each organisation's
whole training share, so Opacus's Poisson sampling rate is 1: no empty batches, whatever N.

With several ``orgs`` values the runs go one after another and ``per_org`` gives the marginal cost of
one more organisation between the smallest and the largest run (memory and disk), which is what
"memory per organisation" means when a fixed part (Python, torch, Ray) dominates small runs.

    python benchmarks/simulation_scale.py                              # 10,000 organisations, 3 rounds
    python benchmarks/simulation_scale.py orgs=1000,10000 out=/tmp/scale-bench
    python benchmarks/simulation_scale.py orgs=30 rounds=1 sampled=4   # smoke run (the test does this)

Prints one JSON line (also written to ``<out>/result.json``); each run's folder and log stay under ``out``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmark_settings import parse_settings

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "sst2" / "train.tsv"
TEST_FRACTION = 0.2

DEFAULTS = {
    "orgs": "10000",  # one count, or several separated by commas (run one after another)
    "sampled": 20,  # organisations drawn to train per round (and, separately, to evaluate)
    "rounds": 3,
    "examples_per_org": 6,  # rows of SST-2 per organisation (train + test)
    "local_epochs": 1,
    "data": str(SST2),
    "timeout": 3600,  # seconds per run; the run's processes are stopped after it
    "interval": 0.5,  # seconds between memory samples
    "out": "",
}
_ROUND_LINE = re.compile(r"^\[round (\d+)/(\d+)\]")
NODE_FILES = ("accountant.json", "privacy_plan.json", "ledger.jsonl", "ledger.key")


def parse_args(argv: list[str]) -> dict:
    args = parse_settings(argv, DEFAULTS)
    try:
        args["orgs"] = [int(n) for n in str(args["orgs"]).split(",") if n.strip()]
    except ValueError:
        raise SystemExit(f"orgs={args['orgs']}: expected counts separated by commas, e.g. orgs=1000,10000") from None
    if not args["orgs"] or min(args["orgs"]) < 2:
        raise SystemExit("orgs: expected counts >= 2, e.g. orgs=1000,10000")
    if not 2 <= args["sampled"] <= min(args["orgs"]):
        raise SystemExit(f"sampled: expected 2..{min(args['orgs'])} (the smallest orgs value)")
    if args["examples_per_org"] < 2:
        raise SystemExit("examples_per_org: expected >= 2 (one to train on, one to test on)")
    return args


def train_share(examples_per_org: int) -> int:
    """Training rows per organisation: what fedpriv.data.data_files.split_indices leaves after the test share."""
    n_test = min(max(int(round(examples_per_org * TEST_FRACTION)), 1), examples_per_org - 1)
    return examples_per_org - n_test


def overrides(args: dict, orgs: int) -> list[str]:
    per_org = args["examples_per_org"]
    fraction = args["sampled"] / orgs  # int(orgs * fraction) may round down: min_*_nodes makes it exact
    return [
        "model.name=tiny",
        "data.source=file",
        f"data.path={args['data']}",
        "data.format=tsv",
        "data.text_column=sentence",
        "data.label_column=label",
        f"data.max_examples={orgs * per_org}",
        f"data.test_fraction={TEST_FRACTION}",
        "data.max_length=32",
        "partitioning.scheme=iid",
        f"partitioning.num_orgs={orgs}",
        f"training.rounds={args['rounds']}",
        f"training.local_epochs={args['local_epochs']}",
        f"training.batch_size={train_share(per_org)}",
        "training.device=cpu",
        f"strategy.fraction_train={fraction!r}",
        f"strategy.min_train_nodes={args['sampled']}",
        f"strategy.fraction_evaluate={fraction!r}",
        f"strategy.min_evaluate_nodes={args['sampled']}",
        "output.export_model=false",
    ]


# --------------------------------------------------------------------------- memory of a process tree


def _proc_table() -> dict[int, int]:
    """pid -> parent pid, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry)] = int(fields[1])
    return table


def tree_pids(root: int) -> list[int]:
    try:
        import psutil

        try:
            proc = psutil.Process(root)
            return [root, *(child.pid for child in proc.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []
    except ImportError:
        parents = _proc_table()
        pids, frontier = [], [root] if root in parents else []
        while frontier:
            pid = frontier.pop()
            pids.append(pid)
            frontier.extend(child for child, parent in parents.items() if parent == pid)
        return pids


def _rss_pss(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes; PSS shares each shared page among the processes that map it (0 if unreadable)."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
    except OSError:
        try:
            rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return rss, pss


class TreeSampler(threading.Thread):
    """Samples the summed RSS / PSS of ``root`` and all its descendants every ``interval`` seconds."""

    def __init__(self, root: int, interval: float):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak_rss = self.peak_pss = self.peak_driver_rss = self.peak_processes = 0
        self.samples = 0
        self.seen: set[int] = set()
        self._halt = threading.Event()

    def sample(self) -> None:
        pids = tree_pids(self.root)
        if not pids:
            return
        self.seen.update(pids)
        totals = [_rss_pss(pid) for pid in pids]
        self.peak_rss = max(self.peak_rss, sum(r for r, _ in totals))
        self.peak_pss = max(self.peak_pss, sum(p for _, p in totals))
        self.peak_driver_rss = max(self.peak_driver_rss, totals[0][0])
        self.peak_processes = max(self.peak_processes, len(pids))
        self.samples += 1

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


# --------------------------------------------------------------------------- disk and state checks


def folder_bytes(path: Path) -> tuple[int, int, int]:
    """(apparent bytes, allocated bytes, files) under ``path``."""
    apparent = allocated = files = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            apparent += st.st_size
            allocated += st.st_blocks * 512
            files += 1
    return apparent, allocated, files


def check_run(run_dir: Path, rounds: int, sampled: int) -> dict:
    """Is summary.json complete, and does every organisation that trained have its state and ledger?"""
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        return {"summary_complete": False, "reason": "no summary.json"}
    summary = json.loads(summary_path.read_text())
    trained = sorted({org for record in summary.get("rounds", []) for org in record.get("trained_orgs", [])})
    per_round = [len(record.get("trained_orgs", [])) for record in summary.get("rounds", [])]
    problems = []
    if summary.get("status") != "completed":
        problems.append(f"status {summary.get('status')!r}")
    if [r.get("round") for r in summary.get("rounds", [])] != list(range(1, rounds + 1)):
        problems.append("rounds missing")
    if any(n != sampled for n in per_round):
        problems.append(f"organisations trained per round {per_round}, expected {sampled}")
    if set(summary.get("privacy", {})) != set(trained):
        problems.append("summary.privacy does not list exactly the organisations that trained")
    for org in trained:
        eps = summary.get("privacy", {}).get(org, {}).get("epsilon")
        if not isinstance(eps, (int, float)) or not eps > 0:
            problems.append(f"{org}: no epsilon in summary")
    missing_state = [org for org in trained if not all((run_dir / "nodes" / org / f).is_file() for f in NODE_FILES)]
    missing_copy = [org for org in trained if not (run_dir / "ledgers" / f"{org}.jsonl").is_file()]
    heads = summary.get("budget", {}).get("ledgers", {})
    node_dirs = [p for p in (run_dir / "nodes").iterdir()] if (run_dir / "nodes").is_dir() else []
    with_state = [p for p in node_dirs if (p / "accountant.json").is_file()]
    return {
        "status": summary.get("status"),
        "summary_complete": not problems,
        "problems": problems[:5],
        "orgs_trained": len(trained),
        "trained_per_round": per_round,
        "every_trained_org_has_accountant_and_ledger": not missing_state,
        "coordinator_holds_every_ledger": not missing_copy and set(heads) == set(trained),
        "node_dirs": len(node_dirs),  # organisations drawn to train or evaluate at least once
        "node_dirs_with_state": len(with_state),  # organisations that trained (an accountant file)
        "epsilon_max": max((summary["privacy"][o]["epsilon"] for o in trained), default=None),
        "round_elapsed_s": [r.get("elapsed_s") for r in summary.get("rounds", [])],
    }


def disk_report(run_dir: Path) -> dict:
    total, total_alloc, files = folder_bytes(run_dir)
    nodes, nodes_alloc, _ = folder_bytes(run_dir / "nodes") if (run_dir / "nodes").is_dir() else (0, 0, 0)
    ledgers, _, _ = folder_bytes(run_dir / "ledgers") if (run_dir / "ledgers").is_dir() else (0, 0, 0)
    with_state = [p for p in (run_dir / "nodes").glob("*") if (p / "accountant.json").is_file()]
    per_trained = [folder_bytes(p) for p in with_state]
    return {
        "run_dir_bytes": total,
        "run_dir_allocated_bytes": total_alloc,
        "run_dir_files": files,
        "nodes_bytes": nodes,
        "nodes_allocated_bytes": nodes_alloc,
        "coordinator_ledgers_bytes": ledgers,
        "state_bytes_per_trained_org": round(sum(b[0] for b in per_trained) / len(per_trained)) if per_trained else 0,
        "state_allocated_bytes_per_trained_org": (
            round(sum(b[1] for b in per_trained) / len(per_trained)) if per_trained else 0
        ),
    }


# --------------------------------------------------------------------------- one run


def _stop_tree(proc: subprocess.Popen, pids: set[int]) -> None:
    """Stop the run's process group, then any process of its tree that left the group (Ray's daemons)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            proc.wait(timeout=10)
            break
        except subprocess.TimeoutExpired:
            continue


def run_once(args: dict, orgs: int, out: Path) -> dict:
    run_dir = out / f"run-{orgs}"
    log_path = out / f"simulate-{orgs}.log"
    command = [sys.executable, "-m", "fedpriv.cli", "simulate", *overrides(args, orgs), "--out", str(run_dir)]
    marks: dict[str, float] = {}
    started = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        proc = subprocess.Popen(
            command,
            cwd=out,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        sampler = TreeSampler(proc.pid, args["interval"])
        sampler.start()
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            _stop_tree(proc, set(sampler.seen) - {proc.pid})

        timer = threading.Timer(args["timeout"], expire)
        timer.start()
        try:
            for line in proc.stdout:
                log.write(line)
                now = round(time.monotonic() - started, 1)
                if line.startswith("run folder:"):
                    marks["preflight_done_s"] = now  # config, data, partitions, every organisation's noise
                elif line.startswith("training:"):
                    marks["server_started_s"] = now  # the ServerApp's first evaluate_fn call (before round 1)
                elif match := _ROUND_LINE.match(line):
                    marks[f"round_{match.group(1)}_s"] = now
            proc.wait()
        finally:
            timer.cancel()
            sampler.stop()
    wall = time.monotonic() - started
    result = {
        "orgs": orgs,
        "sampled_per_round": args["sampled"],
        "rounds": args["rounds"],
        "examples_per_org": args["examples_per_org"],
        "train_examples_per_org": train_share(args["examples_per_org"]),
        "returncode": proc.returncode,
        "timed_out": bool(expired),
        "wall_s": round(wall, 1),
        **marks,
        "peak_tree_rss_mb": round(sampler.peak_rss / 2**20, 1),
        "peak_tree_pss_mb": round(sampler.peak_pss / 2**20, 1),
        "peak_driver_rss_mb": round(sampler.peak_driver_rss / 2**20, 1),
        "peak_processes": sampler.peak_processes,
        "memory_samples": sampler.samples,
        "rss_per_org_kb": round(sampler.peak_rss / 1024 / orgs, 1),  # whole tree / N (fixed part included)
        "log": str(log_path),
    }
    if run_dir.is_dir():
        result.update(disk_report(run_dir))
        result["disk_bytes_per_org"] = round(result["run_dir_bytes"] / orgs, 1)
        result.update(check_run(run_dir, args["rounds"], args["sampled"]))
    return result


def marginal(runs: list[dict]) -> dict | None:
    """Cost of one more organisation between the smallest and the largest completed run."""
    done = sorted((r for r in runs if r.get("summary_complete")), key=lambda r: r["orgs"])
    if len(done) < 2 or done[0]["orgs"] == done[-1]["orgs"]:
        return None
    small, large = done[0], done[-1]
    extra = large["orgs"] - small["orgs"]
    return {
        "between": [small["orgs"], large["orgs"]],
        "tree_rss_kb": round((large["peak_tree_rss_mb"] - small["peak_tree_rss_mb"]) * 1024 / extra, 2),
        "tree_pss_kb": round((large["peak_tree_pss_mb"] - small["peak_tree_pss_mb"]) * 1024 / extra, 2),
        "driver_rss_kb": round((large["peak_driver_rss_mb"] - small["peak_driver_rss_mb"]) * 1024 / extra, 2),
        "disk_bytes": round((large["run_dir_bytes"] - small["run_dir_bytes"]) / extra, 1),
        "wall_ms": round((large["wall_s"] - small["wall_s"]) * 1000 / extra, 2),
        "preflight_ms": round((large.get("preflight_done_s", 0) - small.get("preflight_done_s", 0)) * 1000 / extra, 2),
    }


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    if not Path(args["data"]).is_file():
        raise SystemExit(f"data={args['data']}: not found (SST-2's train.tsv; see ../shared/data/README.md)")
    with open(args["data"], "rb") as handle:
        rows = sum(1 for _ in handle) - 1  # header
    if max(args["orgs"]) * args["examples_per_org"] > rows:
        raise SystemExit(
            f"orgs={max(args['orgs'])} x examples_per_org={args['examples_per_org']} needs more than the {rows} rows"
            f" of {args['data']}: fewer organisations or fewer examples each"
        )
    out = Path(args["out"]) if args["out"] else Path(tempfile.mkdtemp(prefix="fedpriv-scale-bench-"))
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"out={out}: not empty; name a new folder")
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    runs = [run_once(args, orgs, out) for orgs in args["orgs"]]
    result = {
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "memory_sampler": "psutil" if _has_psutil() else "/proc",
        "runs": runs,
        "per_org": marginal(runs),
        "ok": all(r.get("summary_complete") and r.get("every_trained_org_has_accountant_and_ledger") for r in runs),
        "out": str(out),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result))
    return result


def _has_psutil() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv[1:])["ok"] else 1)
