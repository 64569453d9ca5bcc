"""fedpriv run from a source tree: fedpriv.client ... are the tree's top-level folders, and nothing else is.

The same mapping as pyproject's package-dir (tests/test_packaging.py checks the installed side). Two trees in
one process is what a warm SuperExec does: it forgets the node's fedpriv and imports the one of the run's FAB.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import fedpriv

_PROBE = """
import importlib, json, pkgutil, sys
tree_a, tree_b = sys.argv[1], sys.argv[2]
sys.path.insert(0, tree_a)
import fedpriv.client.marker, fedpriv.simulations.marker
seen = {"a": [fedpriv.client.marker.__file__, fedpriv.simulations.marker.__file__]}
try:
    import fedpriv.tests
    seen["tests"] = fedpriv.tests.__file__
except ImportError:
    seen["tests"] = None
seen["walked"] = sorted(m.name for m in pkgutil.walk_packages(fedpriv.__path__, "fedpriv."))
for name in [n for n in sys.modules if n == "fedpriv" or n.startswith("fedpriv.")]:
    del sys.modules[name]  # what a warm SuperExec's child does before it loads the run's FAB
sys.path[0] = tree_b
seen["b"] = importlib.import_module("fedpriv.client.marker").__file__
print(json.dumps(seen))
"""


def _tree(root: Path) -> Path:
    """A source tree: fedpriv/ (this fedpriv's __init__.py), the five app folders and a tests/ package."""
    (root / "fedpriv").mkdir(parents=True)
    shutil.copy(Path(fedpriv.__file__), root / "fedpriv" / "__init__.py")
    (root / "fedpriv" / "kernel").mkdir()
    (root / "fedpriv" / "kernel" / "__init__.py").write_text("")
    for folder in (*fedpriv.SOURCE_FOLDERS, "tests"):
        (root / folder).mkdir()
        (root / folder / "__init__.py").write_text("")
        (root / folder / "marker.py").write_text("")
    return root


def test_the_apps_come_from_the_tree_of_the_fedpriv_imported_and_nothing_else_joins_it(tmp_path):
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(a), str(b)], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["a"] == [str(a / "client" / "marker.py"), str(a / "simulations" / "marker.py")]
    assert seen["tests"] is None  # the tree's other folders are not fedpriv's (no fedpriv.tests, fedpriv.fedpriv)
    assert seen["walked"] == ["fedpriv.kernel"]  # and walking the package ends
    assert seen["b"] == str(b / "client" / "marker.py")  # the second tree's fedpriv gets its own folders


def test_an_installed_layout_needs_no_mapping(tmp_path):
    """A fedpriv with its sub-packages inside (a wheel's layout) is left to Python's own finder."""
    installed = tmp_path / "site" / "fedpriv"
    installed.mkdir(parents=True)
    for folder in fedpriv.SOURCE_FOLDERS:
        (installed / folder).mkdir()
    assert fedpriv.source_tree_root(str(installed / "__init__.py")) is None
    assert fedpriv.source_tree_root(str(_tree(tmp_path / "tree") / "fedpriv" / "__init__.py")) == tmp_path / "tree"
