"""fedpriv/runtime/clientapp_child.py: what a forked child runs, and the code it leaves with."""

from __future__ import annotations

from fedpriv.runtime import clientapp_child
from tests.fedpriv.runtime.superexec_specs import spec


def test_a_failing_clientapp_exits_its_child_with_a_failure_code(monkeypatch):
    def crash(**kwargs):
        raise RuntimeError("boom")

    import flwr.supernode.runtime.run_clientapp as runtime

    monkeypatch.setattr(runtime, "run_clientapp", crash)
    assert clientapp_child.run_task(spec()) == 1  # run in this process: the code the child would _exit with
    monkeypatch.setattr(runtime, "run_clientapp", lambda **kw: (_ for _ in ()).throw(SystemExit(800)))
    assert clientapp_child.run_task(spec()) == 800
