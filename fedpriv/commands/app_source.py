"""The Flower app that ``flwr run`` ships: this project's packages, staged apart from the rest of the checkout.

``flwr build`` (flwr 1.41) walks and resolves every file under the app folder before it filters them by
``.gitignore``: a checkout with its ``.venv`` (~60,000 files) costs about 7 s of CPU per ``flwr run``. A
staged folder holds only what the FAB needs, so the FAB is the same code at a fraction of the cost.
"""

from __future__ import annotations

import shutil
from pathlib import Path

# The source tree's folders that make the fedpriv package (fedpriv/ and the apps it maps in, pyproject's
# package-dir): the code a FAB carries.
APP_PACKAGES = ("fedpriv", "client", "server", "privacy", "shared_models", "simulations")
APP_FILES = ("pyproject.toml", "README.md", ".gitignore")
FLWR_APP_TABLE = "[tool.flwr.app]"


class NotAnAppCheckout(Exception):
    """The installed fedpriv is not a checkout with a Flower app (pyproject.toml with [tool.flwr.app])."""


def project_root() -> Path:
    """The checkout this fedpriv runs from, when it is a Flower app folder."""
    root = Path(__file__).resolve().parents[2]  # fedpriv/commands/ -> the checkout
    pyproject = root / "pyproject.toml"
    if not pyproject.exists() or FLWR_APP_TABLE not in pyproject.read_text(encoding="utf-8"):
        raise NotAnAppCheckout(f"{root}: no pyproject.toml with {FLWR_APP_TABLE}; run from a checkout of fedpriv")
    return root


def stage_app(dest: Path, root: Path | None = None) -> Path:
    """Copy the app's packages and top-level files from ``root`` into ``dest`` (emptied first); returns ``dest``."""
    root = root or project_root()
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in APP_PACKAGES:
        shutil.copytree(root / package, dest / package, ignore=skip)
    for name in APP_FILES:
        if (root / name).is_file():
            shutil.copy2(root / name, dest / name)
    return dest


def fab_sha256(path: str | Path) -> str:
    """The SHA-256 that Flower gives the FAB of ``path``: an app folder built as ``flwr run`` builds it, or a .fab file.

    Flower builds a FAB deterministically (sorted files, a fixed date), so a folder with the same files gives the
    same digest on every machine: what an organisation reviews and pins in its node.yaml (``approved_apps``).
    """
    import hashlib

    path = Path(path)
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(path)).hexdigest()
