"""One tiny DP simulation that several test modules read, run once per test session (a simulation costs ~25 s)."""

from __future__ import annotations

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


def simulate(
    cwd: Path, *args: str, timeout: int = 600, expect_failure: bool = False
) -> tuple[subprocess.CompletedProcess, Path]:
    """``fedpriv simulate ARGS --out CWD/run``, checked for the expected exit code; (process, run folder)."""
    out = cwd / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedpriv.cli", "simulate", *args, "--out", str(out)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == (1 if expect_failure else 0), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, out
