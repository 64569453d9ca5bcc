"""The import-linter contracts CI runs (.ci/lint_imports.py) hold on this tree and break on a layer violation."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports_module():
    spec = importlib.util.spec_from_file_location("fedpriv_ci_lint_imports", ROOT / ".ci" / "lint_imports.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lint(stage: Path, capsys) -> tuple[int, str]:
    from importlinter.cli import lint_imports

    cwd = os.getcwd()
    os.chdir(stage)
    try:
        code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    finally:
        os.chdir(cwd)
    return code, capsys.readouterr().out


def _stage_with_kernel_module(tmp_path: Path, source: str) -> Path:
    """The installed layout, with one more kernel module holding ``source``."""
    stage = tmp_path / "stage"
    stage.mkdir()
    _lint_imports_module().stage_installed_layout(stage)
    kernel = stage / "fedpriv" / "kernel"
    kernel.unlink()  # a link to the real folder: make it a folder of links, plus the planted module
    kernel.mkdir()
    for entry in (ROOT / "fedpriv" / "kernel").iterdir():
        if entry.name != "__pycache__":
            (kernel / entry.name).symlink_to(entry)
    (kernel / "planted.py").write_text(source, encoding="utf-8")
    return stage


def test_the_tree_keeps_both_contracts(tmp_path, capsys):
    code, out = _lint(_stage_with_kernel_module(tmp_path, '"""Nothing."""\n'), capsys)
    assert code == 0, out
    assert "2 kept, 0 broken" in out


def test_a_kernel_module_importing_an_app_breaks_the_layers(tmp_path, capsys):
    code, out = _lint(_stage_with_kernel_module(tmp_path, "from fedpriv.client import node  # noqa: F401\n"), capsys)
    assert code == 1
    assert "fedpriv.kernel.planted -> fedpriv.client.node" in out


def test_a_kernel_module_importing_torch_breaks_the_light_kernel(tmp_path, capsys):
    code, out = _lint(_stage_with_kernel_module(tmp_path, "import torch  # noqa: F401\n"), capsys)
    assert code == 1
    assert "fedpriv.kernel.planted -> torch" in out
