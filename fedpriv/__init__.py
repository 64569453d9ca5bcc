"""fedpriv: federated, differentially private fine-tuning of transformer text classifiers.

One import root. The source tree keeps the apps in top-level folders (``client/``, ``server/``, ``privacy/``,
``shared_models/``, ``simulations/``); an installed fedpriv maps them to ``fedpriv.client`` ... (pyproject's
``package-dir``), so only ``fedpriv`` lands in site-packages. Run from a source tree (a checkout on
``PYTHONPATH``, or the app folder of a Flower FAB) the same names resolve through this package's search path.
"""

from pathlib import Path as _Path

# The folders of the source tree that are fedpriv's sub-packages (pyproject.toml's package-dir says the same).
SOURCE_FOLDERS = ("client", "server", "privacy", "shared_models", "simulations")


def _source_tree_root() -> str | None:
    """The source tree this package sits in, when its apps are beside it rather than inside it (not installed)."""
    here = _Path(__file__).resolve().parent
    if (here / SOURCE_FOLDERS[0]).is_dir():
        return None  # an installed layout: the sub-packages are inside
    root = here.parent
    if all((root / name / "__init__.py").is_file() for name in SOURCE_FOLDERS):
        return str(root)
    return None


_root = _source_tree_root()
if _root is not None:
    __path__.append(_root)  # noqa: F821  (a package's own __path__): fedpriv.client is ROOT/client
del _root
