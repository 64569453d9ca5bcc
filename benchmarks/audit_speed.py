"""How long ``fedpriv audit`` takes on a big run: N organisations x R rounds of signed ledger entries.

Writes a synthetic run folder exactly as a coordinator leaves it (ledgers/<org>.jsonl signed by each
organisation's own Ed25519 key, keys/<org>.pub, heads.json). Each organisation has its own data size,
so its own sampling rate and noise multiplier (no two share a mechanism: nothing is cached across
organisations), trains one local epoch a round, and claims the epsilon its accountant (Opacus's RDP)
would. Then times the audit: dp-accounting's RDP for every entry, without and with its PLD for each
organisation's total.

    python benchmarks/audit_speed.py                  # 100 organisations x 1,000 rounds
    python benchmarks/audit_speed.py orgs=10 rounds=50 out=/tmp/audit-bench
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path

from benchmark_settings import parse_settings

from fedpriv.privacy.audit import audit, load_ledger_set
from fedpriv.privacy.ledger import (
    FORMAT,
    append_lines,
    ensure_signing_key,
    entry_hash,
    genesis_hash,
    public_key_text,
    sign,
)
from fedpriv.privacy.recompute import rdp_epsilons

DEFAULTS = {"orgs": 100, "rounds": 1000, "out": ""}


def write_run(root: Path, orgs: int, rounds: int) -> Path:
    rng = random.Random(0)
    ledgers = root / "ledgers"
    (ledgers / "keys").mkdir(parents=True, exist_ok=True)
    heads = {}
    for index in range(orgs):
        org = f"org-{index:03d}"
        key = ensure_signing_key(root / "org-keys" / f"{org}.key")
        (ledgers / "keys" / f"{org}.pub").write_text(public_key_text(key.public_key()), encoding="utf-8")
        examples = rng.randint(2_000, 50_000)
        per_epoch = max(1, examples // 64)  # Opacus's Poisson loader: q = 1/k for k batches an epoch
        q = 1 / per_epoch
        sigma = round(rng.uniform(0.8, 2.0), 4)
        steps = per_epoch  # one local epoch a round
        claims = rdp_epsilons([(sigma, q, steps)] * rounds, 1e-5)
        previous, entries = genesis_hash(org), []
        for server_round, epsilon in enumerate(claims, start=1):
            body = {
                "format": FORMAT, "org": org, "seq": server_round, "kind": "dp_round", "round": server_round,
                "time": "2026-11-24T00:00:00Z", "prev_hash": previous, "local_steps": steps, "sample_rate": q,
                "noise_multiplier": sigma, "max_grad_norm": 1.0, "delta": 1e-5, "accountant": "rdp",
                "epsilon": epsilon, "num_examples": examples, "model_digest": "ab" * 32,
                "target_epsilon": 1e6, "max_epsilon": 1e6,
            }  # fmt: skip
            entry = sign(body, key)
            entries.append(entry)
            previous = entry_hash(entry)
        append_lines(ledgers / f"{org}.jsonl", entries)
        heads[org] = {"seq": rounds, "hash": previous}
    (ledgers / "heads.json").write_text(json.dumps(heads), encoding="utf-8")
    return root


def main(argv: list[str]) -> dict:
    args = parse_settings(argv, DEFAULTS)
    root = Path(args["out"]) if args["out"] else Path(tempfile.mkdtemp(prefix="fedpriv-audit-bench-"))
    started = time.perf_counter()
    if not (root / "ledgers" / "heads.json").exists():
        if root.exists() and any(root.iterdir()):
            raise SystemExit(f"out={root}: not empty and not a finished benchmark run; name a new folder")
        write_run(root, args["orgs"], args["rounds"])
    written = time.perf_counter() - started
    results = {"orgs": args["orgs"], "rounds": args["rounds"], "entries": args["orgs"] * args["rounds"]}
    results["write_s"] = round(written, 2)
    for label, pld in (("rdp_only_s", False), ("with_pld_s", True)):
        started = time.perf_counter()
        result = audit(load_ledger_set([root]), pld=pld)
        results[label] = round(time.perf_counter() - started, 2)
        results[f"{label.removesuffix('_s')}_ok"] = result.ok
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
