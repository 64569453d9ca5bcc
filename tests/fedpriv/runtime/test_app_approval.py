"""The approved-app gate in front of Flower's SuperNode loop, with Flower's own function and fake connections."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedpriv.runtime import app_approval

APPROVED = b"the FAB the organisation reviewed"
CHANGED = b"the FAB with one changed line"


@dataclass
class FakeRun:
    fab_hash: str


@dataclass
class FakeFab:
    content: bytes
    hash_str: str = ""
    verifications: dict = field(default_factory=dict)


@dataclass
class FakeMetadata:
    run_id: int
    message_id: str = "m1"


@dataclass
class FakeMessage:
    metadata: FakeMetadata


class FakeState:
    def __init__(self) -> None:
        self.runs: dict[int, FakeRun] = {}

    def get_run(self, run_id):
        return self.runs.get(run_id)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _loop(gate, served: dict[int, tuple[str, bytes]]):
    """One pass of the SuperNode loop: Flower's function stand-in stores a run only after fetching its FAB."""
    state, inserted, fetched, ran = FakeState(), [], [], []

    def flower_pull_and_store(*, state, object_store, receive, get_run, get_fab, **_):
        got = receive()
        if got is None:
            return None
        run_id = got[0].metadata.run_id
        if state.get_run(run_id) is None:
            run = get_run(run_id)
            fab = get_fab(run.fab_hash, run_id)
            state.runs[run_id] = run
            ran.append((run_id, fab.content))  # what Flower would hand the ClientApp
        return run_id

    wrapped = gate.wrap(
        flower_pull_and_store,
        lambda text: inserted.append(("log", text)),
        lambda msg, state, store: inserted.append(("reply", msg)),
        lambda message, reason: ("error-reply", message.metadata.run_id, reason),
    )

    def run_message(run_id):
        fab_hash, content = served[run_id]

        def get_fab(h, r):
            fetched.append(r)
            return FakeFab(content)

        return wrapped(
            state=state,
            object_store=None,
            node_config={},
            receive=lambda: (FakeMessage(FakeMetadata(run_id)), None),
            get_run=lambda r: FakeRun(fab_hash),
            get_fab=get_fab,
            pull_object=None,
            confirm_message_received=None,
            trusted_entities=None,
        )

    return run_message, state, inserted, fetched, ran


def test_an_approved_app_runs_and_its_fab_is_fetched_once():
    gate = app_approval.AppGate([_sha(APPROVED)], "node.yaml")
    run_message, state, inserted, fetched, ran = _loop(gate, {7: (_sha(APPROVED), APPROVED)})
    assert run_message(7) == 7 and ran == [(7, APPROVED)] and fetched == [7] and inserted == []
    assert run_message(7) == 7 and fetched == [7]  # a known run is not fetched again


def reply_text(inserted) -> str:
    return next(item for kind, item in inserted if kind == "reply")[2]


def test_an_app_with_one_changed_line_is_refused_before_anything_of_it_runs():
    gate = app_approval.AppGate([_sha(APPROVED)], "kit/node.yaml")
    run_message, state, inserted, fetched, ran = _loop(gate, {8: (_sha(CHANGED), CHANGED)})
    assert run_message(8) == 8  # so that the loop pushes the error reply at once
    assert ran == [] and state.runs == {}
    (kind, text), (reply_kind, reply) = inserted
    assert kind == "log" and text.startswith("fedpriv-supernode: refused run 8: its app (FAB sha256 ")
    assert "kit/node.yaml" not in reply_text(inserted)  # the coordinator is not told where the node keeps files
    assert _sha(CHANGED) in text and _sha(APPROVED) in text and "kit/node.yaml" in text and "\n" not in text
    assert reply_kind == "reply" and reply[0] == "error-reply" and reply[1] == 8 and _sha(CHANGED) in reply[2]
    assert run_message(8) == 8 and fetched == [8]  # every later message of it: refused again, not fetched again
    assert [k for k, _ in inserted] == ["log", "reply", "reply"]


def test_a_fab_that_is_not_the_runs_own_hash_is_refused_even_if_approved():
    """A SuperLink claiming an approved hash for other bytes: the node hashes what it received."""
    gate = app_approval.AppGate([_sha(APPROVED), _sha(CHANGED)], "node.yaml")
    run_message, state, inserted, _, ran = _loop(gate, {9: (_sha(APPROVED), CHANGED)})
    run_message(9)
    assert ran == [] and "not the run's fab_hash" in inserted[0][1]


def test_no_approved_app_refuses_every_app():
    gate = app_approval.AppGate([], "node.yaml")
    run_message, _, inserted, _, ran = _loop(gate, {1: (_sha(APPROVED), APPROVED)})
    run_message(1)
    assert ran == [] and "approved_apps: none" in inserted[0][1]


def test_the_patch_point_is_where_this_flower_release_fetches_fabs():
    from flwr.supernode import start_client_internal

    app_approval.check_patch_point(start_client_internal)


def test_a_node_with_an_invalid_own_setting_stops_with_one_line(tmp_path: Path):
    node_yaml = tmp_path / "node.yaml"
    node_yaml.write_text("org: hospital-a\ndata: {path: notes.csv}\nprivacy: {target_epsilon: -1}\n")
    script = str(Path(sys.executable).parent / "fedpriv-supernode")
    done = subprocess.run(
        [script, "--superlink", "127.0.0.1:9", "--node-config", f"node-config='{node_yaml}'"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"fedpriv-supernode: node config {node_yaml}: privacy.target_epsilon: expected a number > 0, got -1"
    )


@pytest.mark.parametrize("argv", [[], ["--node-config", "other=1"]])
def test_a_node_without_its_settings_does_not_start(argv):
    from fedpriv.runtime.supernode import load_own_settings

    with pytest.raises(SystemExit, match="--node-config .* is required"):
        load_own_settings(argv)
