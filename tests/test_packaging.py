"""What ``pip install`` puts in site-packages: fedpriv alone, with every package and file of the source tree.

The apps keep top-level folders in the source tree (client/, server/, ...) and install as fedpriv.client, ...
(pyproject's package-dir and its explicit packages list): a package left out of that list, or a folder mapped to
a top-level name, would install a broken or squatting fedpriv that no source-tree test notices.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import fedpriv

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = ("fedpriv", *fedpriv.SOURCE_FOLDERS)  # pyproject's package-dir: fedpriv.<folder> = <folder>
PROJECT_FILES = ("pyproject.toml", "README.md")


def installed_name(source: Path) -> str:
    """Where a file of the source tree lands in site-packages: client/x.py -> fedpriv/client/x.py."""
    relative = source.relative_to(REPO_ROOT).as_posix()
    return relative if relative.startswith("fedpriv/") else f"fedpriv/{relative}"


def source_files(pattern: str) -> set[Path]:
    return {
        path
        for folder in PACKAGE_FOLDERS
        for path in (REPO_ROOT / folder).rglob(pattern)
        if "__pycache__" not in path.parts and path.is_file()
    }


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    """The files of a wheel built from a copy of the project (the build leaves build/ and *.egg-info beside it)."""
    pytest.importorskip("setuptools", minversion="77")  # project.license as an SPDX string (PEP 639)
    copy = tmp_path_factory.mktemp("project")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in PACKAGE_FOLDERS:
        shutil.copytree(REPO_ROOT / folder, copy / folder, ignore=skip)
    for name in PROJECT_FILES:
        shutil.copy2(REPO_ROOT / name, copy / name)
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(copy)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = out.glob("fedpriv-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_the_wheel_installs_nothing_beside_fedpriv(wheel_names):
    top = {name.split("/", 1)[0] for name in wheel_names}
    dist_info = {name for name in top if name.endswith(".dist-info")}
    assert len(dist_info) == 1 and next(iter(dist_info)).startswith("fedpriv-")
    assert top - dist_info == {"fedpriv"}


def test_every_package_and_module_of_the_source_tree_is_in_the_wheel(wheel_names):
    packages = {installed_name(path) for path in source_files("__init__.py")}
    assert "fedpriv/client/__init__.py" in packages and "fedpriv/data/__init__.py" in packages
    assert sorted(packages - wheel_names) == []
    modules = {installed_name(path) for path in source_files("*.py")}
    assert sorted(modules - wheel_names) == []


def test_the_package_data_is_in_the_wheel(wheel_names):
    data = {installed_name(path) for path in source_files("*.yaml")}
    assert "fedpriv/kernel/configs/default.yaml" in data
    assert sorted(data - wheel_names) == []
