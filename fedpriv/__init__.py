"""fedpriv: federated, differentially private fine-tuning of transformer text classifiers.

One import root. The source tree keeps the apps in top-level folders (``client/``, ``server/``, ``privacy/``,
``shared_models/``, ``simulations/``); an installed fedpriv maps them to ``fedpriv.client`` ... (pyproject's
``package-dir``), so only ``fedpriv`` lands in site-packages. Run from a source tree (a checkout on
``PYTHONPATH``, or the app folder of a Flower FAB) :class:`SourceTreeFinder` resolves the same names.
"""

import sys
from importlib.util import spec_from_file_location
from pathlib import Path as _Path

# The folders of the source tree that are fedpriv's sub-packages (pyproject.toml's package-dir says the same).
SOURCE_FOLDERS = ("client", "server", "privacy", "shared_models", "simulations")


def source_tree_root(package_file: str | None) -> _Path | None:
    """The source tree a fedpriv package (its ``__init__.py``) sits in, when the apps are beside it rather than
    inside it; None for an installed layout."""
    if not package_file:
        return None
    here = _Path(package_file).resolve().parent
    if (here / SOURCE_FOLDERS[0]).is_dir():
        return None  # installed: the sub-packages are inside
    root = here.parent
    if all((root / name / "__init__.py").is_file() for name in SOURCE_FOLDERS):
        return root
    return None


class SourceTreeFinder:
    """Finds ``fedpriv.client`` ... in the top-level folders of the source tree of the fedpriv being imported.

    What pyproject's package-dir does for an installed fedpriv, for exactly those five names (nothing else of
    the tree, such as tests/, becomes part of fedpriv). It asks the ``fedpriv`` in ``sys.modules`` at each import,
    so after a warm SuperExec forgets the node's own fedpriv and imports a FAB's, the FAB's folders are used.
    """

    fedpriv_source_tree = True  # one finder serves every fedpriv imported in this process

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        package, _, name = fullname.partition(".")
        if package != __name__ or name not in SOURCE_FOLDERS:
            return None
        root = source_tree_root(getattr(sys.modules.get(__name__), "__file__", None))
        if root is None:
            return None
        folder = root / name
        return spec_from_file_location(fullname, folder / "__init__.py", submodule_search_locations=[str(folder)])


if source_tree_root(__file__) is not None and not any(
    getattr(finder, "fedpriv_source_tree", False) for finder in sys.meta_path
):
    sys.meta_path.insert(0, SourceTreeFinder)  # before the path finder and any editable-install finder
