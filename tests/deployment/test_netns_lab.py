"""Quick checks of the network-namespace lab the deployment tests build on: reachability, isolation, cleanup."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

import pytest

from tests.deployment.netns import NetLab, _pid_alive, list_namespaces, namespace_pids, netns_missing_reason

REASON = netns_missing_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

PREFIX = "fptest"
PORT = 8080  # any port is free in a fresh namespace

SERVER = """
import socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    conn, peer = srv.accept()
    conn.sendall(f"hello {peer[0]}".encode())
    conn.close()
"""

CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as conn:
    print(conn.recv(100).decode())
"""

ORPHAN = """
import subprocess
subprocess.Popen(["sleep", "300"], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
"""


def start_server(lab: NetLab, host: str, bind: str) -> subprocess.Popen:
    """The tiny TCP server in ``host`` bound to ``bind:PORT``, once it says it listens."""
    proc = lab.popen(host, [sys.executable, "-c", SERVER, bind, str(PORT)], stdout=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 5)
    assert ready and proc.stdout.readline().strip() == "ready", "server did not start"
    return proc


def test_two_hosts_reach_each_other_over_tcp():
    with NetLab(PREFIX, ["a", "b"]) as lab:
        assert lab.address("a") != lab.address("b")
        assert lab.address("a").startswith("198.1")
        start_server(lab, "a", lab.address("a"))
        done = lab.run("b", [sys.executable, "-c", CLIENT, lab.address("a"), str(PORT)], timeout=5, check=True)
        assert done.stdout.strip() == f"hello {lab.address('b')}"  # the peer is b's own lab address
        assert lab.ping_ok("a", "b") and lab.ping_ok("b", "a")


def test_loopback_listener_is_private_to_its_host():
    with NetLab(PREFIX, ["a", "b"]) as lab:
        start_server(lab, "a", "127.0.0.1")
        assert lab.tcp_probe("a", "127.0.0.1", PORT) == "connected"
        start = time.monotonic()
        assert lab.tcp_probe("b", lab.address("a"), PORT) == "refused"
        assert lab.tcp_probe("b", "127.0.0.1", PORT) == "refused"  # b's own loopback, not a's
        assert time.monotonic() - start < 3, "refusal should be immediate, not a timeout"


def test_exit_leaves_no_namespace_and_no_process():
    # A stale namespace "left by a crashed run": the pid of a process that has exited.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = f"{PREFIX}-{dead.stdout.strip()}-dead-x"
    subprocess.run(["ip", "netns", "add", stale], check=True, timeout=10)
    pids: list[int] = []
    names: list[str] = []
    with pytest.raises(KeyError), NetLab(PREFIX, ["a", "b"]) as lab:
        assert stale not in list_namespaces(), "entering should remove stale namespaces of the prefix"
        names = lab.namespaces
        assert set(names) <= set(list_namespaces())
        root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
        assert " p0" not in root_links and "br0" not in root_links, "nothing should be made in the root namespace"
        lab.popen("a", ["sleep", "300"])
        lab.popen("b", ["sh", "-c", "trap '' TERM; sleep 300 & wait"])  # ignores SIGTERM: needs the SIGKILL
        # An orphan that left our process groups: only the namespace sweep can find it.
        lab.run("b", [sys.executable, "-c", ORPHAN], timeout=5, check=True)
        time.sleep(0.2)
        pids = [pid for ns in names for pid in namespace_pids(ns)]
        assert len(pids) >= 4
        raise KeyError("an exception in the body must still clean up")
    left = set(list_namespaces())
    assert not left & set(names), "the lab's namespaces must be gone"  # others may be running labs in parallel
    assert stale not in left
    assert not [pid for pid in pids if _pid_alive(pid)]
    assert os.getpid() not in pids
