"""The staged Flower app: the same app code as the checkout, without walking the checkout's .venv."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from fedpriv.commands.app_source import APP_PACKAGES, NotAnAppCheckout, project_root, stage_app


def _fab_names(app: Path) -> set[str]:
    from flwr.cli.build import build_fab_from_disk

    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))) as fab:
        return set(fab.namelist())


def test_the_staged_fab_carries_every_app_module_and_config_and_nothing_else(tmp_path):
    root = project_root()
    staged = stage_app(tmp_path / "app")
    names = _fab_names(staged)

    expected = {
        path.relative_to(root).as_posix()
        for package in APP_PACKAGES
        for path in (root / package).rglob("*")
        if path.suffix in {".py", ".yaml"} and "__pycache__" not in path.parts
    }
    assert "fedpriv/kernel/configs/default.yaml" in expected
    assert "client/client_app.py" in expected and "server/server_app.py" in expected
    assert expected <= names
    outside = {name.partition("/")[0] for name in names - expected}
    assert outside <= {"pyproject.toml", "README.md", ".info"}, outside
    assert not any(name.partition("/")[0] in {".venv", "tests", "benchmarks", "runs"} for name in names)


def test_staging_again_replaces_the_folder(tmp_path):
    staged = stage_app(tmp_path / "app")
    (staged / "client" / "leftover.py").write_text("x = 1\n", encoding="utf-8")
    stage_app(tmp_path / "app")
    assert not (staged / "client" / "leftover.py").exists()
    assert (staged / "client" / "client_app.py").is_file()


def test_a_folder_without_a_flower_app_is_refused(tmp_path, monkeypatch):
    import fedpriv.commands.app_source as app_source

    fake = tmp_path / "site-packages" / "fedpriv" / "commands" / "app_source.py"
    fake.parent.mkdir(parents=True)
    monkeypatch.setattr(app_source, "__file__", str(fake))
    with pytest.raises(NotAnAppCheckout, match=r"site-packages: no pyproject.toml with \[tool.flwr.app\]"):
        app_source.project_root()
