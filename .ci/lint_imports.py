"""Check the import contracts of pyproject.toml ([tool.importlinter]) against fedpriv as it is installed.

import-linter reads a package from the folder Python finds it in, but in a source tree fedpriv's sub-packages
(client/, server/, ...) sit beside fedpriv/ and join it only at import time (pyproject's package-dir,
fedpriv/__init__.py). So this builds the installed layout out of symlinks in a temporary folder and runs
import-linter there: every module is checked under its installed name. Run by .ci/run and ``make lint``.
(A plain ``lint-imports`` in a checkout sees only fedpriv/ and stops: the contract's app layers are missing.)
"""

import os
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stage_installed_layout(stage: Path, root: Path = ROOT) -> None:
    """Link each folder of pyproject's package-dir where it lands when installed (fedpriv.client -> fedpriv/client)."""
    package_dir = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in sorted(package_dir.items()):  # a package before the packages mapped into it
        target = stage.joinpath(*package.split("."))
        if any(other.startswith(package + ".") for other in package_dir):  # a real folder: others join it
            target.mkdir(parents=True)
            for entry in (root / folder).iterdir():
                if entry.name != "__pycache__":
                    (target / entry.name).symlink_to(entry)
        else:
            target.symlink_to(root / folder, target_is_directory=True)


def lint(stage: Path) -> int:
    """import-linter's exit code for the layout staged in ``stage`` (found first on the path, whatever else is)."""
    from importlinter.cli import lint_imports

    os.chdir(stage)
    sys.path.insert(0, str(stage))
    return lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="fedpriv-layers-") as stage:
        stage_installed_layout(Path(stage))
        return lint(Path(stage))


if __name__ == "__main__":
    sys.exit(main())
