"""Where a ClientApp message's time goes, for benchmarks (off unless ``FEDPRIV_STAGE_TIMINGS`` names a file).

Under a SuperNode every message runs in a fresh ``flwr-clientapp`` process, so
a round with SecAgg+ (four train messages and one evaluate message per node)
pays process start-up five times. With the variable set, each message appends
one JSON line: the message kind (the SecAgg+ stage for the workflow's
messages), how long the process had been alive when the handler was entered
(interpreter, Flower and app imports), how long the handler took, and the named
phases inside it (``phase("model")``...), and the process's peak resident set.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedpriv.kernel.protocol import message_round, message_stage

ENV_VAR = "FEDPRIV_STAGE_TIMINGS"
PULLED_AT_ENV = (
    "FEDPRIV_TASK_INPUT_PULLED_AT"  # fedpriv/runtime/superexec.py: when the message was in hand (wall clock)
)
WARM_RUN_ENV = "FEDPRIV_WARM_RUN"  # fedpriv/runtime/superexec.py: forked from the run's warm process
STEPS_ENV = "FEDPRIV_TASK_STEPS"  # fedpriv/runtime/superexec.py: when each start-up step ended (wall clock)
_phases: dict[str, float] = {}


def enabled() -> bool:
    return bool(os.environ.get(ENV_VAR))


def process_age_s() -> float:
    """Seconds since this process started (Linux ``/proc``; 0.0 where unavailable)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time a named part of the handler (added up if entered twice)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        _phases[name] = _phases.get(name, 0.0) + time.perf_counter() - started


def stage_timings(msg, context, call_next):
    """ClientApp mod: one JSON line per message into the file ``FEDPRIV_STAGE_TIMINGS`` names."""
    path = os.environ.get(ENV_VAR)
    if not path:
        return call_next(msg, context)
    entry = {
        "node_id": int(context.node_id),
        "node_config": {key: str(value) for key, value in context.node_config.items()},
        "round": message_round(msg),
        "stage": message_stage(msg),
        "pid": os.getpid(),
        "started_after_s": round(process_age_s(), 3),
        "entered_at": round(time.time(), 3),  # wall clock, to line messages up with the SuperNode's log
    }
    if os.environ.get(WARM_RUN_ENV):  # forked from a run process that held the node's data and model
        entry["warm_run"] = True
    pulled_at = os.environ.get(PULLED_AT_ENV)  # set by fedpriv-superexec's forked children
    if pulled_at:  # the message and its arrays were in hand this long after the process started
        entry["input_pulled_after_s"] = round(entry["started_after_s"] - (entry["entered_at"] - float(pulled_at)), 3)
    steps = os.environ.get(STEPS_ENV)
    if steps:  # start-up steps (connected, pulled, installed, app_loaded), seconds after the process started
        started = entry["entered_at"] - entry["started_after_s"]
        entry["steps"] = {name: round(float(at) - started, 3) for name, at in json.loads(steps).items()}
    _phases.clear()
    started = time.perf_counter()
    try:
        return call_next(msg, context)
    finally:
        entry["handler_s"] = round(time.perf_counter() - started, 3)
        entry["phases"] = {name: round(value, 3) for name, value in _phases.items()}
        entry["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB
        line = json.dumps(entry) + "\n"
        with open(path, "a", encoding="utf-8") as handle:  # one short append per message: lines do not interleave
            handle.write(line)
