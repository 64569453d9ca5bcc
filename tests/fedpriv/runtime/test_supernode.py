"""fedpriv-supernode: Flower's SuperNode loop with a short idle poll and the warm SuperExec."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from flwr.supernode import start_client_internal

from fedpriv.runtime import node_wakeups, patch_points, supernode


def test_the_patch_points_exist_in_this_flower_release():
    assert patch_points.refusal("fedpriv-supernode") is None  # fails loudly when a Flower upgrade moves them


def test_patch_points_that_moved_are_refused(monkeypatch):
    monkeypatch.delattr(start_client_internal, "subprocess")  # Flower's SuperNode loop no longer starts a SuperExec
    assert "start_client_internal.subprocess is missing" in patch_points.refusal("fedpriv-supernode")


def test_install_shortens_the_idle_wait_and_starts_the_warm_superexec(monkeypatch):
    monkeypatch.setattr(start_client_internal, "time", start_client_internal.time)
    monkeypatch.setattr(start_client_internal, "subprocess", start_client_internal.subprocess)
    monkeypatch.setattr(start_client_internal, "pull_objects", start_client_internal.pull_objects)
    pull = start_client_internal._pull_and_store_message
    monkeypatch.setattr(start_client_internal, "_pull_and_store_message", pull)
    from flwr.supernode.servicer.runtime import runtime_handlers

    for name in (*node_wakeups.ARRIVALS, "acquire_task"):
        monkeypatch.setattr(runtime_handlers, name, getattr(runtime_handlers, name))
    monkeypatch.delenv(node_wakeups.LONG_POLL_ENV, raising=False)
    supernode.install(0.05)
    assert start_client_internal.pull_objects.fedpriv_prompt  # a message's arrays, from the SuperLink
    assert runtime_handlers.acquire_task.fedpriv_long_poll and start_client_internal._pull_and_store_message is not pull
    assert os.environ[node_wakeups.LONG_POLL_ENV] == "1"  # the SuperExec it starts asks again at once

    started = time.monotonic()
    start_client_internal.time.sleep(3)  # Flower's idle wait
    assert time.monotonic() - started < 1.0
    # the loop's local waits (Flower: 0.5 s polls for its ClientApp's reply) end when the reply arrives
    start_client_internal.time.sleep(0.01)  # whatever arrived before
    threading.Timer(0.15, node_wakeups.WAKEUPS.note).start()
    started = time.monotonic()
    start_client_internal.time.sleep(0.5)
    assert 0.1 < time.monotonic() - started < 0.4
    started = time.monotonic()
    start_client_internal.time.sleep(0.5)  # nothing arrives: no extra polls in between
    assert time.monotonic() - started > 0.45
    assert start_client_internal.time.monotonic() > 0  # everything else is the real time module

    launched = []
    monkeypatch.setattr(subprocess, "Popen", lambda args, *a, **k: launched.append(args))
    start_client_internal.subprocess.Popen(["flower-superexec", "--insecure", "--runtime-api-address", "x:1"])
    start_client_internal.subprocess.Popen(["something-else"])
    assert launched[0][-3:] == ["--insecure", "--runtime-api-address", "x:1"]
    assert launched[0][0].endswith("fedpriv-superexec") or launched[0][1:3] == ["-m", "fedpriv.runtime.superexec"]
    assert launched[1] == ["something-else"]


@pytest.mark.parametrize("raw", ["0", "abc", "120"])
def test_a_bad_poll_interval_is_one_clear_line(monkeypatch, raw):
    monkeypatch.setenv(supernode.POLL_ENV, raw)
    with pytest.raises(SystemExit, match="FEDPRIV_NODE_POLL_S.*expected seconds between 0.01 and 60"):
        supernode.poll_interval()


def test_the_poll_interval_defaults_and_can_be_set(monkeypatch):
    monkeypatch.delenv(supernode.POLL_ENV, raising=False)
    assert supernode.poll_interval() == supernode.DEFAULT_POLL_S
    monkeypatch.setenv(supernode.POLL_ENV, "1.5")
    assert supernode.poll_interval() == 1.5


def test_without_its_speed_ups_the_node_keeps_the_approved_app_check_on_flowers_own_loop(tmp_path, monkeypatch):
    """What start-supernode.sh falls back to where Flower moved a speed-up's patch point (FEDPRIV_NODE_SPEEDUPS=0)."""
    from flwr.supernode import cli

    from fedpriv.runtime import app_approval

    node_yaml = tmp_path / "node.yaml"
    node_yaml.write_text("org: hospital-a\ndata: {path: notes.csv}\nprivacy: {target_epsilon: 8}\n")
    gated, started = [], []
    monkeypatch.setattr(app_approval, "install", lambda module, approved, path: gated.append(path))
    monkeypatch.setattr(supernode, "install", lambda poll_s: pytest.fail("speed-ups installed"))
    monkeypatch.setattr(cli, "flower_supernode", lambda: started.append(True))
    monkeypatch.setattr(sys, "argv", ["fedpriv-supernode", "--node-config", f"node-config='{node_yaml}'"])
    monkeypatch.setenv(patch_points.SPEEDUPS_ENV, "0")
    monkeypatch.delattr(start_client_internal, "time")  # a speed-up's patch point, moved: not needed now
    supernode.main()
    assert gated == [str(node_yaml)] and started == [True]
