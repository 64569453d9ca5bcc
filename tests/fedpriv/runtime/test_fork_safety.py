"""fedpriv/runtime/fork_safety.py: a forked child never runs another FAB's code."""

from __future__ import annotations

import sys

from fedpriv.runtime import fork_safety


def test_app_modules_from_another_folder_are_noticed(tmp_path, monkeypatch):
    import types

    stray = types.ModuleType("fedpriv.client.stray_for_test")  # an app module (one import root: fedpriv)
    stray.__file__ = str(tmp_path / "elsewhere" / "fedpriv" / "client" / "stray_for_test.py")
    monkeypatch.setitem(sys.modules, "fedpriv.client.stray_for_test", stray)
    assert "fedpriv.client.stray_for_test" in fork_safety.app_modules_outside(tmp_path / "fab")
    assert "fedpriv.client.stray_for_test" not in fork_safety.app_modules_outside(tmp_path / "elsewhere")
