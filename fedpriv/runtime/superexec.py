"""A SuperExec that forks each ClientApp from a process that already imported torch and friends.

Flower's SuperExec starts every ClientApp message in a new ``flwr-clientapp``
process: a SecAgg+ round sends five messages per node, and each one paid the
interpreter, Flower, torch, transformers, PEFT and Opacus imports again (seconds
per message on a busy CPU; see BENCHMARKS.md). ``fedpriv-superexec`` is Flower's
own ``flower-superexec`` (same command line, same task loop, same Runtime API and
token handling) with one change: the executor forks a child of this warm process
instead of exec'ing a fresh interpreter. The child runs Flower's own
``run_clientapp`` with the task's token, exactly as ``flwr-clientapp`` would, so the
ClientApp still comes from the run's FAB and still runs in its own process (one
message, one process; a crash or a kill takes only that message down).

Only third-party modules are imported ahead of time, and pure-data caches built
(transformers' checkpoint conversion mapping, Presidio's compiled redaction
patterns: ``warm_caches``); no torch operation, no CUDA initialisation, no thread
pool, so the children start as clean as a fresh interpreter would. It then
prints ``READY_LINE``, which ``fedpriv federation up`` waits for before the run.
Tasks are picked up every 0.2 s instead of every second; under
``fedpriv-supernode``, whose ``AcquireTask`` itself waits for a task (a long
poll, fedpriv/runtime/node_wakeups.py), as soon as they are stored
(``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` still overrides both).

A warm process per run (``FEDPRIV_WARM_RUNS``, default 2 runs per node; 0: off) keeps the node's data and
model template loaded for every message of the run (fedpriv/runtime/run_process.py).

The parts: fedpriv/runtime/warm_imports.py (the warm-up), fork_executor.py (the executor Flower's task loop
calls) with pipe_frames.py (its pipes), run_process.py (a run's warm process), clientapp_child.py (what a
forked child runs), fork_safety.py (what keeps forks clean) and superexec_patch.py (the installation into
Flower). This module is the command.
"""

from __future__ import annotations

import os
import sys

from fedpriv.runtime import patch_points
from fedpriv.runtime.node_wakeups import LONG_POLL_ENV
from fedpriv.runtime.superexec_patch import install
from fedpriv.runtime.warm_imports import preload, warm_caches

POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower's own variable: seconds between task polls
DEFAULT_POLL_S = "0.2"
LONG_POLL_INTERVAL_S = "0.01"
READY_LINE = "fedpriv-superexec: warm"  # printed once imports and caches are in: `fedpriv federation up` waits for it


def main() -> None:
    """``fedpriv-superexec``: ``flower-superexec`` with warm, forked ClientApp processes."""
    patch_points.refuse_unless_fits("fedpriv-superexec")  # one line and exit 2 where Flower moved a patch point
    # started by fedpriv-supernode, whose AcquireTask waits for a task itself (fedpriv/runtime/node_wakeups.py): ask again
    # at once; from any other SuperNode, every 0.2 s
    os.environ.setdefault(POLL_ENV, LONG_POLL_INTERVAL_S if os.environ.get(LONG_POLL_ENV) else DEFAULT_POLL_S)
    loaded = preload()
    filled = warm_caches()
    print(f"{READY_LINE} ({len(loaded)} modules preloaded; {', '.join(filled) or 'no cache'} built)", file=sys.stderr)
    sys.stderr.flush()
    install()
    from flwr.supercore.cli import flower_superexec

    flower_superexec()


if __name__ == "__main__":
    main()
