"""fedpriv/runtime/patch_points.py: the Flower internals each command patches, checked before it patches them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from flwr.superlink.servicer.fleet import fleet_handlers
from flwr.supernode import start_client_internal

from fedpriv.runtime import patch_points, superexec, superlink, supernode


@pytest.mark.parametrize("command", sorted(patch_points.COMMANDS))
def test_every_patch_point_is_in_place_in_the_installed_flower(command):
    assert patch_points.refusal(command) is None


def _refused(main, capsys) -> str:
    """``main()``'s refusal: exit code 2 and exactly one line on stderr (no traceback); returns the line."""
    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err.strip()


def test_a_moved_fleet_handler_stops_fedpriv_superlink_with_one_line(monkeypatch, capsys):
    monkeypatch.delattr(fleet_handlers, "pull_messages")
    monkeypatch.setattr(superlink, "install", lambda *a: pytest.fail("patched a Flower that moved"))
    line = _refused(superlink.main, capsys)
    version = patch_points.installed_flower()
    assert line.startswith("fedpriv-superlink: refusing to patch Flower: patch point ")
    assert f"flwr.superlink.servicer.fleet.fleet_handlers.pull_messages is missing in flwr {version}" in line
    assert line.endswith("; run flower-superlink instead")


def test_a_flower_release_outside_the_range_is_refused_before_any_patch(monkeypatch, capsys):
    monkeypatch.setattr(patch_points, "installed_flower", lambda: "1.43.0")
    monkeypatch.setattr(superexec, "preload", lambda: pytest.fail("warmed up on a Flower it does not fit"))
    line = _refused(superexec.main, capsys)
    assert "flwr 1.43.0 is outside the releases the warm SuperExec" in line
    assert "flwr.supercore.superexec.run_superexec.get_executor" in line  # the first patch point it names
    assert line.endswith("; run flower-superexec instead")


def test_a_parameter_renamed_by_flower_is_a_moved_patch_point(monkeypatch, capsys):
    from flwr.supercore.superexec import run_superexec

    def get_executor(kind, config=None):  # what a later release might call it
        raise AssertionError

    monkeypatch.setattr(run_superexec, "get_executor", get_executor)
    line = _refused(superexec.main, capsys)
    assert "run_superexec.get_executor has no parameter 'executor_type', 'executor_config'" in line


def test_an_executor_protocol_that_asks_for_more_is_a_moved_patch_point(monkeypatch):
    from flwr.supercore.superexec.executor import types

    class Executor(types.Executor):
        def drain(self) -> None: ...

    monkeypatch.setattr(types, "Executor", Executor)
    assert "fedpriv implements" in patch_points.refusal("fedpriv-superexec")


def test_source_markers_and_proto_fields_are_checked():
    assert (
        "no longer contains `time.sleep(7)`"
        in patch_points.calls(start_client_internal.__name__, "time.sleep(7)").check()
    )
    assert (
        "has no field 'tasks'" in patch_points.message("flwr.proto.runtime_pb2", "AcquireTaskResponse", "tasks").check()
    )
    assert patch_points.value("json", "__name__", "json").check() is None
    assert "is 'json', not 'yaml'" in patch_points.value("json", "__name__", "yaml").check()
    assert "cannot be imported" in patch_points.member("flwr.no_such_module", "x").check()


def test_fedpriv_supernode_refuses_a_moved_approved_app_check_even_without_its_speed_ups(monkeypatch, capsys):
    monkeypatch.setenv(patch_points.SPEEDUPS_ENV, "0")
    monkeypatch.delattr(start_client_internal, "time")  # a speed-up's patch point: not needed without them
    monkeypatch.setattr(sys, "argv", ["fedpriv-supernode", patch_points.CHECK_FLAG])
    with pytest.raises(SystemExit) as stopped:
        supernode.main()
    assert stopped.value.code == 0  # the check alone, and it passes
    monkeypatch.delattr(start_client_internal, "_pull_and_store_message")
    line = _refused(supernode.main, capsys)
    assert "_pull_and_store_message is missing" in line and "the approved-app check" in line
    assert line.endswith(
        "flower-supernode would run any app: FEDPRIV_SUPERNODE=flower-supernode ./start-supernode.sh if that is acceptable"
    )


def test_fedpriv_supernode_names_its_speed_ups_switch_when_one_of_them_moved(monkeypatch, capsys):
    monkeypatch.delenv(patch_points.SPEEDUPS_ENV, raising=False)
    monkeypatch.delattr(start_client_internal, "time")
    line = _refused(supernode.main, capsys)
    assert "start_client_internal.time is missing" in line and "FEDPRIV_NODE_SPEEDUPS=0" in line
    monkeypatch.setenv(patch_points.SPEEDUPS_ENV, "maybe")
    assert _refused(supernode.main, capsys) == "fedpriv-supernode: FEDPRIV_NODE_SPEEDUPS='maybe': expected 0 or 1"


@pytest.mark.parametrize("command", ["fedpriv-superlink", "fedpriv-supernode", "fedpriv-superexec"])
def test_check_flower_alone_exits_0_without_starting_anything(command):
    script = Path(sys.executable).parent / command
    done = subprocess.run([str(script), "--check-flower"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "" and done.stdout == ""
