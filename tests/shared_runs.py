"""One tiny DP simulation that several test modules read, run once per test session (a simulation costs ~25 s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# three organisations, the tiny model, DP-SGD at the default epsilon 8, two rounds
TINY_DP_RUN = [
    "model.name=tiny",
    "training.rounds=2",
    "partitioning.num_orgs=3",
    "partitioning.scheme=iid",
    "data.max_examples=300",
    "training.batch_size=16",
    "data.max_length=64",
]


# the shared run's nodes say their progress inside a round every 0.05 s (client/progress.py; 30 s by default)
TINY_DP_RUN_ENV = {"FEDPRIV_PROGRESS_S": "0.05"}


def simulate(
    cwd: Path, *args: str, timeout: int = 600, expect_failure: bool = False, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess, Path]:
    """``fedpriv simulate ARGS --out CWD/run`` (``env`` added to the environment), checked for the expected exit
    code; (process, run folder)."""
    out = cwd / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedpriv.cli", "simulate", *args, "--out", str(out)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == (1 if expect_failure else 0), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, out


# Several `fedpriv simulate` runs in one process, one after the other: the interpreter, the imports and the
# ServerApp's first model build are paid once (two canary runs: 36 s, not 43 s); each run still starts its own
# Ray and its own nodes. Each run's start is marked on stdout and on stderr.
_MARK = "=== fedpriv simulate run: "
_EXIT = "=== exit code: "
_SEQUENCE = f"""
import json, sys
from fedpriv.cli import main

for name, args in json.loads(sys.argv[1]):
    print({_MARK!r} + name, flush=True)
    print({_MARK!r} + name, file=sys.stderr, flush=True)
    code = main(["simulate", *args])
    print({_EXIT!r} + str(code), flush=True)
"""


def _parts(stream: str) -> dict[str, str]:
    parts = {}
    for part in stream.split(_MARK)[1:]:
        name, _, rest = part.partition("\n")
        parts[name] = rest
    return parts


def simulate_in_sequence(
    cwd: Path, runs: dict[str, list[str]], timeout: int = 900, stderr: bool = False
) -> dict[str, tuple]:
    """``fedpriv simulate ARGS --out CWD/NAME`` for each NAME: ARGS of ``runs``, in one process; {NAME: (exit code,
    its stdout, its run folder)}, or with ``stderr`` {NAME: (exit code, its stdout, its stderr, its run folder)}.
    Fails (with the output) only if the process itself failed."""
    todo = [(name, [*args, "--out", str(cwd / name)]) for name, args in runs.items()]
    proc = subprocess.run(
        [sys.executable, "-c", _SEQUENCE, json.dumps(todo)], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = _parts(proc.stderr)
    results = {}
    for name, rest in _parts(proc.stdout).items():
        output, _, code = rest.rpartition(_EXIT)
        results[name] = (int(code.split()[0]), output, *([errors.get(name, "")] if stderr else []), cwd / name)
    assert sorted(results) == sorted(runs), proc.stdout[-3000:] + proc.stderr[-3000:]
    return results
