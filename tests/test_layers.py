"""The import-linter contracts CI runs (.ci/lint_imports.py) hold on this tree and break on a layer violation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

ROOT = Path(__file__).resolve().parents[1]

# .ci/lint_imports.py on the installed layout staged from this tree, with one more kernel module planted in it
_LINT_WITH_PLANTED = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import lint_imports
stage, root, source = Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
lint_imports.stage_installed_layout(stage)
kernel = stage / "fedpriv" / "kernel"
kernel.unlink()  # a link to the real folder: a folder of links instead, plus the planted module
kernel.mkdir()
for entry in (root / "fedpriv" / "kernel").iterdir():
    if entry.name != "__pycache__":
        (kernel / entry.name).symlink_to(entry)
(kernel / "planted.py").write_text(source, encoding="utf-8")
sys.exit(lint_imports.lint(stage))
"""


def _lint_with_planted(tmp_path: Path, source: str) -> subprocess.CompletedProcess:
    """A process of its own, without PYTHONPATH: what CI runs, whatever this test process has imported."""
    stage = tmp_path / "stage"
    stage.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    command = [sys.executable, "-c", _LINT_WITH_PLANTED, str(ROOT / ".ci"), str(stage), str(ROOT), source]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def test_the_tree_keeps_both_contracts(tmp_path):
    done = _lint_with_planted(tmp_path, '"""Nothing."""\n')
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout


def test_a_kernel_module_importing_an_app_breaks_the_layers(tmp_path):
    done = _lint_with_planted(tmp_path, "from fedpriv.client import node  # noqa: F401\n")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "fedpriv.kernel.planted -> fedpriv.client.node" in done.stdout


def test_a_kernel_module_importing_torch_breaks_the_light_kernel(tmp_path):
    done = _lint_with_planted(tmp_path, "import torch  # noqa: F401\n")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "fedpriv.kernel.planted -> torch" in done.stdout
