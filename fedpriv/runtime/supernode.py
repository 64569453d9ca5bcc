"""``fedpriv-supernode``: Flower's ``flower-supernode`` with warm ClientApps and a short idle poll.

Same command line and behaviour as ``flower-supernode`` (TLS, node
authentication, node config, isolation modes), with changes that take the
waiting out of a round:

- in the default ``--isolation subprocess`` mode the SuperNode starts
  ``fedpriv-superexec`` (fedpriv/runtime/superexec.py) where it would start
  ``flower-superexec``: messages run in processes forked from one that already
  imported torch, transformers, PEFT and Opacus;
- when the SuperLink had no message for it, the node asks again after
  ``FEDPRIV_NODE_POLL_S`` seconds (default 0.5) instead of Flower's fixed 3 s.
  A SecAgg+ round is five message exchanges, so a 3 s idle poll alone cost up
  to 15 s per round. Each node then asks the SuperLink twice a second when
  idle: raise the value for federations of thousands of nodes;
- its local waits end when something arrives instead of at the next poll
  (fedpriv/runtime/node_wakeups.py): the SuperExec's request for a task is held until
  a message is stored (a long poll), and the loop's wait for its ClientApp's
  reply ends when the reply is pushed;
- a message's arrays not yet on the SuperLink are asked for again within
  0.05-0.5 s instead of after Flower's 1, 2, 4, 8 s back-off (fedpriv/runtime/object_pulls.py).

They are patched into the module that holds Flower's SuperNode loop
(``flwr.supernode.start_client_internal``) and its Runtime API handlers;
fedpriv/runtime/patch_points.py checks them (and the approved-app check's) before
anything is patched and refuses, in one line, a Flower release that moved them.
With ``FEDPRIV_NODE_SPEEDUPS=0`` only the approved-app check is installed:
Flower's own SuperNode loop, idle poll and ``flower-superexec`` (what the kit's
start-supernode.sh falls back to when the speed-ups do not fit the installed Flower).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from fedpriv.kernel.env_settings import env_number
from fedpriv.runtime import node_wakeups, patch_points
from fedpriv.runtime.node_wakeups import PULL_CLOCK, LocalWaits, PullClock

POLL_ENV = "FEDPRIV_NODE_POLL_S"
DEFAULT_POLL_S = 0.5
LOCAL_WAIT_S = 0.5  # the longest local wait (its ClientApp's reply, that reply's objects); arrivals end it sooner
FLOWER_IDLE_WAIT_S = 3  # start_client_internal: ``time.sleep(3)`` when the SuperLink had no message
FLOWER_SUPEREXEC = "flower-superexec"


def poll_interval() -> float:
    return env_number("fedpriv-supernode", POLL_ENV, DEFAULT_POLL_S, 0.01, 60, unit="seconds")


class ShortWaits:
    """The ``time`` module as the SuperNode loop sees it: the idle wait is ``idle_s``; a local wait ends when its
    ClientApp pushes something back (fedpriv/runtime/node_wakeups.py), after 0.5 s at most as in Flower."""

    def __init__(self, idle_s: float, local: LocalWaits | None = None, clock: PullClock | None = None) -> None:
        self.idle_s = idle_s
        self.local = local or LocalWaits(LOCAL_WAIT_S)
        self.clock = clock or PULL_CLOCK

    def sleep(self, seconds: float) -> None:
        if seconds >= FLOWER_IDLE_WAIT_S:  # after an empty pull: less what the SuperLink held it (a long poll)
            time.sleep(max(self.idle_s - self.clock.last_s, 0.0))
        else:
            self.local.sleep(seconds)

    def __getattr__(self, name: str):
        return getattr(time, name)


class WarmSuperExec:
    """The ``subprocess`` module as the SuperNode loop sees it: ``flower-superexec`` becomes ``fedpriv-superexec``."""

    def __init__(self, command: list[str]) -> None:
        self.command = command

    def Popen(self, args, *rest, **kwargs):  # noqa: N802 - stands in for subprocess.Popen
        if isinstance(args, list) and args and args[0] == FLOWER_SUPEREXEC:
            args = [*self.command, *args[1:]]
        return subprocess.Popen(args, *rest, **kwargs)

    def __getattr__(self, name: str):
        return getattr(subprocess, name)


def superexec_command() -> list[str]:
    """How to start ``fedpriv-superexec`` with this interpreter (the console script where installed)."""
    script = shutil.which(
        "fedpriv-superexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    )
    return [script] if script else [sys.executable, "-m", "fedpriv.runtime.superexec"]


def install(poll_s: float) -> None:
    from flwr.supernode import start_client_internal
    from flwr.supernode.servicer.runtime import runtime_handlers

    from fedpriv.runtime import object_pulls

    object_pulls.install(start_client_internal)  # the arrays of a message, from the SuperLink
    node_wakeups.install(runtime_handlers, start_client_internal)  # waits that end when something arrives
    start_client_internal.time = ShortWaits(poll_s)
    start_client_internal.subprocess = WarmSuperExec(superexec_command())
    os.environ[node_wakeups.LONG_POLL_ENV] = "1"  # inherited by the SuperExec it starts: ask again at once


def node_config_path(argv: list[str]) -> str | None:
    """The organisation's node.yaml, from ``--node-config "node-config='PATH'"`` as the kit's script passes it."""
    from flwr.common.config import parse_config_args

    from fedpriv.kernel.protocol import NODE_CONFIG_FILE

    values = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--node-config"]
    values += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--node-config=")]
    for value in values:
        try:
            parsed = parse_config_args([value])
        except (ValueError, TypeError):
            continue
        if NODE_CONFIG_FILE in parsed:
            return str(parsed[NODE_CONFIG_FILE])
    return None


def load_own_settings(argv: list[str]):
    """The organisation's node.yaml, validated before anything starts: a mistake stops the node with one line."""
    from fedpriv.kernel.errors import ConfigError
    from fedpriv.kernel.node_config import load_node_config
    from fedpriv.kernel.protocol import NODE_CONFIG_FILE

    path = node_config_path(argv)
    if path is None:
        raise SystemExit(
            f"fedpriv-supernode: --node-config \"{NODE_CONFIG_FILE}='PATH/node.yaml'\" is required: the organisation's"
            " own settings (data, privacy budget, approved apps); start it with the kit's start-supernode.sh"
        )
    try:
        return path, load_node_config(path)
    except ConfigError as exc:
        raise SystemExit(f"fedpriv-supernode: {exc}") from None


def speedups_on() -> bool:
    """Whether this node runs with its speed-ups (``FEDPRIV_NODE_SPEEDUPS``, 1 by default; 0: the approved-app check
    only, on Flower's own SuperNode loop and flower-superexec)."""
    raw = os.environ.get(patch_points.SPEEDUPS_ENV) or "1"
    if raw not in ("0", "1"):
        raise SystemExit(f"fedpriv-supernode: {patch_points.SPEEDUPS_ENV}={raw!r}: expected 0 or 1")
    return raw == "1"


def _or_stop(step):
    """``step()``; its SystemExit message becomes one line on stderr and exit code 2 (a mistake in the setup)."""
    try:
        return step()
    except SystemExit as exc:
        print(exc.code, file=sys.stderr)
        raise SystemExit(2) from None


def main() -> None:
    speedups = _or_stop(speedups_on)
    # before anything is patched: one line and exit 2 where Flower moved a patch point (or --check-flower alone)
    patch_points.refuse_unless_fits(
        "fedpriv-supernode", patch_points.COMMANDS["fedpriv-supernode"] if speedups else (patch_points.APPROVED_APPS,)
    )
    path, node = _or_stop(lambda: load_own_settings(sys.argv[1:]))  # before Flower starts anything
    from flwr.supernode import start_client_internal

    from fedpriv.runtime import app_approval

    app_approval.install(start_client_internal, node.approved_apps, path)
    if speedups:
        install(poll_interval())
    from flwr.supernode.cli import flower_supernode

    flower_supernode()


if __name__ == "__main__":
    main()
