"""A SuperNode that runs only the apps its organisation approved (``approved_apps`` in its node.yaml).

A Flower SuperNode runs whatever ClientApp code the run's FAB carries, with
the node's data and its ledger signing key in reach. Here the node checks the
FAB of every run it has not seen before, *in the SuperNode process*, before
the run is stored and before any of its code is started: the SHA-256 of the
FAB's bytes (computed here, never taken from the SuperLink's word) must be
one the organisation listed, and must be the run's own ``fab_hash``. Any other
app is refused: the node logs one line naming the hash it got and those it
accepts, answers every message of that run with an error reply (Flower's
``INVALID_FAB`` code, the reason in words) so the coordinator sees the
refusal, and never runs, stores or starts anything of it.

Flower's own ``--trusted-entities`` check needs signatures that only Flower's
hosted app registry supplies (``valid_license``); offline, a locally
submitted FAB carries none, so it cannot approve anything here.

Patched into ``flwr.supernode.start_client_internal`` around
``_pull_and_store_message`` (the one function that learns of new runs and
fetches their FABs); :func:`check_patch_point` fails loudly if a Flower
release changes it.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from pathlib import Path

PATCHED = "_pull_and_store_message"
EXPECTED_KEYWORDS = ("state", "object_store", "receive", "get_run", "get_fab")


def fab_digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


class AppGate:
    """Decides, per run, whether its FAB is one of ``approved`` (SHA-256 hex digests)."""

    def __init__(self, approved: list[str], node_yaml: str | Path) -> None:
        self.approved = list(approved)
        self.node_yaml = str(node_yaml)
        self.refused: dict[int, str] = {}  # run id -> reason (each of its messages gets the same answer)

    def refusal(self, run_id: int, run_fab_hash: str, content: bytes) -> str | None:
        """Why the run's app is refused (what the coordinator is told), or None when it is approved."""
        got = fab_digest(content)
        accepted = ", ".join(self.approved) if self.approved else "none"
        if got != run_fab_hash:
            return (
                f"refused run {run_id}: its FAB's SHA-256 is {got}, not the run's fab_hash {run_fab_hash}"
                f" (approved_apps: {accepted})"
            )
        if got not in self.approved:
            return (
                f"refused run {run_id}: its app (FAB sha256 {got}) is not approved by this organisation"
                f" (approved_apps: {accepted})"
            )
        return None

    def wrap(self, pull_and_store: Callable[..., int | None], log, insert_message, error_reply):
        """``pull_and_store`` with every new run's FAB checked before Flower stores the run or starts anything."""
        gate = self

        def pull_and_store_checked(**kwargs):
            state, store = kwargs["state"], kwargs["object_store"]
            receive, get_run, get_fab = kwargs["receive"], kwargs["get_run"], kwargs["get_fab"]
            approved_runs: dict[int, tuple] = {}
            refused: list[tuple] = []

            def receive_checked():
                got = receive()
                if got is None:
                    return None
                message = got[0]
                run_id = message.metadata.run_id
                if run_id in gate.refused:
                    refused.append((message, gate.refused[run_id]))
                    return None
                if state.get_run(run_id) is not None:  # accepted when its first message came
                    return got
                run = get_run(run_id)
                fab = get_fab(run.fab_hash, run_id)
                reason = gate.refusal(run_id, run.fab_hash, fab.content)
                if reason is not None:
                    gate.refused[run_id] = reason
                    log(f"fedpriv-supernode: {reason}; approve an app in {gate.node_yaml}")
                    refused.append((message, reason))
                    return None
                approved_runs[run_id] = (run, fab)  # Flower stores exactly the FAB that was checked
                return got

            def get_run_checked(run_id: int):
                return approved_runs[run_id][0] if run_id in approved_runs else get_run(run_id)

            def get_fab_checked(fab_hash: str, run_id: int):
                if run_id in approved_runs:
                    return approved_runs[run_id][1]
                fab = get_fab(fab_hash, run_id)
                if fab_digest(fab.content) not in gate.approved:  # never reached through Flower's own flow
                    raise RuntimeError(f"fedpriv-supernode: FAB of run {run_id} fetched outside the approval check")
                return fab

            kwargs.update(receive=receive_checked, get_run=get_run_checked, get_fab=get_fab_checked)
            run_id = pull_and_store(**kwargs)
            if refused:  # answer the message: the coordinator sees this node refuse instead of waiting for it
                message, reason = refused[0]
                insert_message(error_reply(message, reason), state, store)
                return message.metadata.run_id  # so the loop pushes the reply now
            return run_id

        pull_and_store_checked.fedpriv_app_gate = True
        return pull_and_store_checked


def check_patch_point(module) -> None:
    """Fail loudly when Flower's SuperNode loop no longer fetches FABs where the gate looks."""
    function = getattr(module, PATCHED, None)
    if function is None or not callable(function) or not callable(getattr(module, "_insert_message", None)):
        raise SystemExit(f"fedpriv-supernode: {module.__name__}.{PATCHED} is missing in this Flower release")
    params = inspect.signature(inspect.unwrap(function)).parameters
    source = inspect.getsource(module)
    if not all(name in params for name in EXPECTED_KEYWORDS) or f"run_id = {PATCHED}(" not in source:
        raise SystemExit(
            f"fedpriv-supernode: {module.__name__}.{PATCHED} changed in this Flower release (the approved-app"
            " check cannot be installed); refusing to start a node that would run unapproved apps"
        )
    if "state=state," not in source[source.index(f"run_id = {PATCHED}(") :][:400]:
        raise SystemExit(f"fedpriv-supernode: {module.__name__}.{PATCHED} is no longer called with keywords")


def install(module, approved: list[str], node_yaml: str | Path) -> AppGate:
    """Put the gate in front of Flower's ``_pull_and_store_message`` in ``module`` (start_client_internal)."""
    from logging import ERROR

    from flwr.common import Error, Message
    from flwr.common.constant import ErrorCode
    from flwr.common.logger import log as flower_log

    check_patch_point(module)
    gate = AppGate(approved, node_yaml)
    current = getattr(module, PATCHED)
    if getattr(current, "fedpriv_app_gate", False):
        return gate

    def error_reply(message, reason: str):
        return Message(Error(ErrorCode.INVALID_FAB, reason), reply_to=message)

    setattr(
        module,
        PATCHED,
        gate.wrap(current, lambda text: flower_log(ERROR, text), module._insert_message, error_reply),
    )
    return gate
